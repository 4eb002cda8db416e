"""Continuous batching for Generate: one scheduler per decoder replica.

Each scheduler loops while it has work: one `generate_batch` call per round closes the sessions
whose clients went away, admits waiting requests into free KV-cache slots, and takes one decode
step for every open sequence. A request therefore joins at the next step, a finished or cancelled
one leaves at the next step, and each request's tokens go to its own queue as they are generated.

A speculating request borrows a replica of its draft model for the scheduler's batch (the draft's
cache rows mirror the target's slots), so the draft replica serves no generations of its own until
the last speculating sequence leaves.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cluster.errors import ClusterError, ModelUnavailable, RankFailure
from cluster.handle import GenerationRound

log = logging.getLogger("tpcluster.gateway")


@dataclass(frozen=True)
class Ended:
    """The last item of a generation's queue: its sequence finished or was closed."""

    summary: Any  # cluster.generation.engine.SessionSummary


@dataclass(eq=False)
class Generation:
    """One Generate request as the scheduler sees it; its consumer reads `out`."""

    request: Any  # cluster.generation.engine.GenerationRequest
    draft: Any = None  # the draft's ServedModel
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # StepResult..., then Ended, or an exception
    session: int | None = None
    cancelled: bool = False


class ReplicaScheduler:
    def __init__(self, model: Any, replica: Any, capacity: int) -> None:
        self.model = model  # the ServedModel this replica belongs to
        self.replica = replica
        self.capacity = capacity
        self.waiting: deque[Generation] = deque()
        self.active: dict[int, Generation] = {}
        self.closing: dict[int, Generation] = {}
        self.draft_lender: ReplicaScheduler | None = None  # the draft replica lent to this batch
        self.lent_to: ReplicaScheduler | None = None  # set while this replica serves as another batch's draft
        self.in_round = False  # a generate_batch call is in flight (its admissions not yet active)
        self._resync = True  # first round, or after a failed one: the coordinator closes sessions not active here
        # (left by a failed round, or by a previous gateway on an adopted replica)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.active)

    def submit(self, generation: Generation) -> None:
        self.waiting.append(generation)
        self.wake()

    def wake(self) -> None:
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def cancel(self, generation: Generation) -> None:
        """The client went away (or stopped reading): free its slot at the next round."""
        generation.cancelled = True
        if generation in self.waiting:
            self.waiting.remove(generation)
        elif generation.session is not None and self.active.pop(generation.session, None) is not None:
            self.closing[generation.session] = generation
            self.wake()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- the loop ---------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            if not (self.active or self.closing or self._admissible()):
                self._release_draft()
                self._wake.clear()
                await self._wake.wait()
                continue
            opens = self._take_opens()
            if not (opens or self.active or self.closing):  # waiting for a draft replica to be free
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), 0.05)
                except asyncio.TimeoutError:
                    pass
                continue
            closes = dict(self.closing)
            self.closing.clear()
            self.in_round = True
            try:
                result = await self.replica.coordinator.aio.generate_batch(
                    [(g.request, d) for g, d in opens], list(closes), sorted(self.active), self._resync,
                    timeout=self.model.pool.config.call_timeout_s)
            except Exception as exc:
                self._failed(exc, [g for g, _ in opens])
                continue
            finally:
                self.in_round = False
            self._resync = False
            try:
                self._deliver(result, [g for g, _ in opens], closes)
            except Exception as exc:  # a bug here must not leave its clients waiting for their deadlines
                log.exception("model %s replica %d: delivering a step failed", self.model.name, self.replica.index)
                self._failed(exc, [])

    def _admissible(self) -> bool:
        return bool(self.waiting) and self.lent_to is None and self.replica.ready

    def _take_opens(self) -> list[tuple[Generation, Any]]:
        """Waiting requests that fit the free slots (and, when speculating, the borrowed draft)."""
        opens: list[tuple[Generation, Any]] = []
        if not self._admissible():
            return opens
        free = self.capacity - len(self.active) - len(self.closing)
        for generation in list(self.waiting):
            if len(opens) >= free:
                break
            draft = None
            if generation.draft is not None:
                draft = self._borrow_draft(generation.draft)
                if draft is None:
                    continue  # its draft is busy: later requests may still fit
            self.waiting.remove(generation)
            opens.append((generation, draft))
        return opens

    def _borrow_draft(self, draft_model: Any) -> Any:
        held = self.draft_lender
        if held is not None:
            return held.replica.coordinator if held.model is draft_model else None
        for candidate in draft_model.schedulers:
            idle = not (candidate.active or candidate.closing or candidate.in_round)
            if candidate.replica.ready and candidate.lent_to is None and idle:
                candidate.lent_to, self.draft_lender = self, candidate
                return candidate.replica.coordinator
        return None

    def _release_draft(self) -> None:
        if self.draft_lender is not None and not any(g.draft is not None for g in self.active.values()):
            lender, self.draft_lender = self.draft_lender, None
            lender.lent_to = None
            if lender.waiting:
                lender.wake()

    def _deliver(self, result: GenerationRound, opened: list[Generation], closes: dict[int, Generation]) -> None:
        for generation, outcome in zip(opened, result.opened):
            if isinstance(outcome, BaseException):
                generation.out.put_nowait(outcome)
            elif generation.cancelled:  # went away while its admission was in flight
                generation.session = outcome
                self.closing[outcome] = generation
            else:
                generation.session = outcome
                self.active[outcome] = generation
        if result.steps:
            self.model.record_batch(len(result.steps))
        for session, step in result.steps.items():
            generation = self.active.get(session)
            if generation is not None:
                generation.out.put_nowait(step)
        for session, summary in result.summaries.items():
            generation = self.active.pop(session, None) or closes.get(session)
            if generation is not None:
                generation.out.put_nowait(Ended(summary))
        self._release_draft()

    def _failed(self, exc: BaseException, opened: list[Generation]) -> None:
        """A round failed: its requests get the error; the next round closes whatever it left open."""
        where = f"model {self.model.name!r} replica {self.replica.index}"
        if isinstance(exc, (ModelUnavailable, RankFailure)):  # ranks or coordinator lost, with the caches
            self.model.pool.lost(self.replica, exc)
            error: ClusterError = ModelUnavailable(f"{where}: {str(exc).splitlines()[0]}")
        elif isinstance(exc, ClusterError):  # a timeout (ClusterTimeout) included: DEADLINE_EXCEEDED everywhere
            error = exc
        else:
            error = ClusterError(f"{where}: generation failed: {exc}")
            error.__cause__ = exc
        log.warning("%s: %d generation(s) failed: %s", where, len(self.active) + len(opened), str(error).splitlines()[0])
        for generation in [*self.active.values(), *opened]:
            generation.out.put_nowait(error)
        self.active.clear()
        self.closing.clear()
        self._resync = True
        self._release_draft()
        if not self.replica.ready:  # waiting requests go to another replica, or learn there is none
            waiting, self.waiting = list(self.waiting), deque()
            for generation in waiting:
                self.model.route(generation)
