"""Continuous batching for Generate: one scheduler per decoder replica.

The generation loop runs in the replica's coordinator (`cluster.generation.rounds`): the scheduler
opens a round stream and the coordinator runs round after round (close, admit, one step for
every open sequence), handing each round over as it is made. New requests (into free KV-cache
slots) and cancellations reach the running stream as admissions, taken at its next round. A
request therefore joins at the next step, a finished or cancelled one leaves at the next step,
each request's tokens go to its own queue as they are generated, and no gateway hop sits on the
per-token path.

A speculating request borrows a replica of its draft model for the scheduler's batch (the draft's
cache rows mirror the target's slots), so the draft replica serves no generations of its own until
the last speculating sequence leaves; a draft fused into the target needs no borrowing.

A scheduler knows its own replica only. What lies across replicas (where a new generation goes,
where the generations of a lost replica go on, which draft replica is lent) is the router's
(actors.gateway.router), which the scheduler reaches through the `Router` interface below.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable, Protocol

from cluster.errors import ClusterError, ModelUnavailable, RankFailure
from cluster.generation.types import GenerationRequest, GenerationRound, SessionSummary, StepResult

if TYPE_CHECKING:
    from actors.gateway.pool import Replica, ReplicaPool
    from cluster.handle import CoordinatorHandle

log = logging.getLogger("tpcluster.gateway")


@dataclass(frozen=True)
class Ended:
    """The last item of a generation's queue: its sequence finished or was closed."""

    summary: SessionSummary


@dataclass(eq=False)
class Generation:
    """One Generate request as the scheduler sees it; its consumer reads `out`."""

    request: GenerationRequest | None  # None only for a session a failed stream left, to be closed
    # the draft model's router; a name (a str) when the ranks hold the draft (fused into the target, or n-gram)
    draft: Router | str | None = None
    # StepResult..., then Ended, or an exception
    out: asyncio.Queue[StepResult | Ended | BaseException] = field(default_factory=asyncio.Queue)
    session: int | None = None
    cancelled: bool = False
    emitted: list[int] = field(default_factory=list)  # tokens handed to `out` since `request` was made
    # the scheduler it is queued on or runs on (it moves when its replica is lost)
    scheduler: ReplicaScheduler | None = None

    def carried_on(self, max_prompt: int) -> GenerationRequest | None:
        """The request that continues this generation on another replica (its prompt and the tokens
        already streamed, `resumed`), or None when it cannot: several rows, a prompt that would not
        fit the prefill, or nothing left to generate."""
        request = self.request
        if self.cancelled or request is None or len(request.prompts) != 1:
            return None
        prompt = tuple(request.prompts[0]) + tuple(self.emitted)
        resumed = request.resumed + len(self.emitted)
        if len(prompt) > max_prompt or resumed >= request.max_new_tokens:
            return None
        return dataclasses.replace(request, prompts=(prompt,), resumed=resumed)

    @property
    def borrows_draft(self) -> bool:
        """Whether it speculates with a draft replica borrowed from another model."""
        return self.draft is not None and not isinstance(self.draft, str)


class Router(Protocol):
    """What a scheduler asks of the router above the schedulers of a model (implemented by
    actors.gateway.router.GenerationRouter): its own router takes the generations its replica lost,
    and a speculating generation's draft model lends this batch one of its replicas."""

    def on_lost(self, scheduler: ReplicaScheduler, generations: list[Generation]) -> list[Generation]:
        """`scheduler`'s replica lost `generations`: carry on those that can go on; returns the others."""
        ...

    def on_stream_failed(self, scheduler: ReplicaScheduler) -> None:
        """`scheduler`'s stream failed and it holds no sequences: its waiting generations may go elsewhere."""
        ...

    def lend(self, borrower: ReplicaScheduler) -> ReplicaScheduler | None:
        """A free replica of this (draft) model, lent to `borrower`'s batch; None when none is free."""
        ...

    def take_back(self, lender: ReplicaScheduler) -> None:
        """`lender`'s borrower gave it back: it serves its own generations again."""
        ...


class ReplicaScheduler:
    """Continuous batching on one decoder replica (see the module docstring). It reports losses to
    `router`, the pool's `lost` takes a lost replica out of rotation, and `record_batch(rows)` counts
    each round's open sequences."""

    def __init__(self, model: str, replica: Replica, capacity: int, pool: ReplicaPool, router: Router,
                 record_batch: Callable[[int], None]) -> None:
        self.model = model  # the model's name
        self.replica = replica
        self.capacity = capacity
        self.pool = pool
        self.router = router  # the router of this replica's model
        self._record_batch = record_batch
        self.waiting: deque[Generation] = deque()
        self.active: dict[int, Generation] = {}
        self.closing: dict[int, Generation] = {}  # cancelled, to be closed at the next round
        self.closes_sent: dict[int, Generation] = {}  # sent to the coordinator, until their summary comes
        self.admitted: dict[int, Generation] = {}  # by tag: sent to the coordinator, until their session comes
        self.draft_lender: ReplicaScheduler | None = None  # the draft replica lent to this batch
        self.lent_to: ReplicaScheduler | None = None  # set while this replica serves as another batch's draft
        self._resync = True  # first stream, or after a failed one: the coordinator closes sessions not active here
        # (left by a failed stream, or by a previous gateway on an adopted replica)
        self._stream_id = f"gateway-{uuid.uuid4().hex}"
        self._rounds: AsyncIterator[GenerationRound] | None = None
        self._tags = itertools.count()
        self.rounds = 0  # rounds the coordinator delivered (one batch step each, of one or more decode steps)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.admitted) + len(self.active)

    @property
    def busy(self) -> bool:
        """Sequences here or on their way: the replica cannot be lent as a draft."""
        return bool(self.active or self.closing or self.closes_sent or self.admitted)

    def submit(self, generation: Generation) -> None:
        generation.scheduler = self
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
        next_round: asyncio.Future | None = None
        wake: asyncio.Future | None = None
        try:
            while True:
                self._send(self._take_opens())
                if self._rounds is not None and next_round is None:
                    next_round = asyncio.ensure_future(self._rounds.__anext__())
                if next_round is None:  # no stream: idle, or waiting for a draft replica to be free
                    self._release_draft()
                    await self._sleep(0.05 if self._admissible() else None)
                    continue
                wake = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({next_round, wake}, return_when=asyncio.FIRST_COMPLETED)
                wake.cancel()
                self._wake.clear()
                if not next_round.done():
                    continue  # new work or a cancellation: sent at the top of the loop
                finished, next_round = next_round, None
                try:
                    result = finished.result()
                except StopAsyncIteration:  # the coordinator had nothing left to do for a while
                    self._rounds = None
                    self._lost_sessions()
                    continue
                except Exception as exc:
                    self._rounds = None
                    self._failed(exc)
                    continue
                try:
                    self._deliver(result)
                except Exception as exc:  # a bug here must not leave its clients waiting for their deadlines
                    log.exception("model %s replica %d: delivering a step failed", self.model, self.replica.index)
                    self._rounds = None
                    self._failed(exc)
        finally:
            for pending in (next_round, wake):
                if pending is not None:
                    pending.cancel()

    def _lost_sessions(self) -> None:
        """After a stream ends, sessions still active here were not live on the coordinator: it lost them."""
        if not self.active:
            return
        error = ModelUnavailable(f"model {self.model!r} replica {self.replica.index} lost the generation "
                                 "(the replica was rebuilt); retry")
        for generation in self.router.on_lost(self, list(self.active.values())):
            generation.out.put_nowait(error)
        self.active.clear()
        self.closes_sent.clear()

    def take_waiting(self) -> list[Generation]:
        """Its waiting generations, which leave it (to go to another replica)."""
        waiting, self.waiting = list(self.waiting), deque()
        return waiting

    async def _sleep(self, timeout: float | None) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _send(self, opens: list[tuple[Generation, CoordinatorHandle | str | None]]) -> None:
        """Admissions and closes to the coordinator: a new stream when none runs, else into the running one."""
        closes = dict(self.closing)
        self.closing.clear()
        tagged = []
        for generation, draft in opens:
            tag = next(self._tags)
            self.admitted[tag] = generation
            tagged.append((tag, generation.request, draft))
        self.closes_sent.update(closes)
        aio, timeout = self.replica.coordinator.aio, self.pool.config.call_timeout_s
        if self._rounds is None:
            if not self.busy:
                return
            self._rounds = aio.generate_rounds(self._stream_id, tagged, list(closes), sorted(self.active), self._resync,
                                               timeout=timeout)
            self._resync = False
        elif tagged or closes:
            admission = asyncio.ensure_future(aio.generate_admit(self._stream_id, tagged, list(closes), timeout=timeout))
            admission.add_done_callback(_ignore_failure)  # a lost coordinator fails the stream too, and is handled there

    def _admissible(self) -> bool:
        return bool(self.waiting) and self.lent_to is None and self.replica.ready

    def _take_opens(self) -> list[tuple[Generation, CoordinatorHandle | str | None]]:
        """Waiting requests that fit the free slots (and, when speculating, the borrowed draft)."""
        opens: list[tuple[Generation, CoordinatorHandle | str | None]] = []
        if not self._admissible():
            return opens
        free = self.capacity - len(self.active) - len(self.closing) - len(self.closes_sent) - len(self.admitted)
        for generation in list(self.waiting):
            if len(opens) >= free:
                break
            draft = generation.draft  # a name (a fused or n-gram draft) goes to the target's coordinator as it is
            if generation.borrows_draft:
                draft = self._borrow_draft(generation.draft)
                if draft is None:
                    continue  # its draft is busy: later requests may still fit
            self.waiting.remove(generation)
            opens.append((generation, draft))
        return opens

    def _borrow_draft(self, draft: Router) -> CoordinatorHandle | None:
        """The coordinator of the draft replica this batch holds when it is `draft`'s, else of the one
        `draft` lends now; None while the batch holds another model's draft, or none is free."""
        held = self.draft_lender
        if held is not None:
            return held.replica.coordinator if held.router is draft else None
        self.draft_lender = draft.lend(self)
        return None if self.draft_lender is None else self.draft_lender.replica.coordinator

    def _release_draft(self) -> None:
        """Give the borrowed draft back once no speculating sequence is here or on its way: admitted
        and not yet reported, running, or cancelled and not yet closed (it still steps until then)."""
        holding = [*self.admitted.values(), *self.active.values(), *self.closing.values(), *self.closes_sent.values()]
        if self.draft_lender is not None and not any(g.borrows_draft for g in holding):
            lender, self.draft_lender = self.draft_lender, None
            lender.router.take_back(lender)

    def _deliver(self, result: GenerationRound) -> None:
        self.rounds += 1
        for tag, outcome in zip(result.tags, result.opened):
            generation = self.admitted.pop(tag, None)
            if generation is None:  # admitted by a stream that failed since: nobody waits for it
                if isinstance(outcome, int):
                    self.closing[outcome] = Generation(None, cancelled=True, session=outcome)
            elif isinstance(outcome, BaseException):
                generation.out.put_nowait(outcome)
            elif generation.cancelled:  # went away while its admission was in flight
                generation.session = outcome
                self.closing[outcome] = generation
            else:
                generation.session = outcome
                self.active[outcome] = generation
        if result.steps:
            self._record_batch(len(result.steps))
        for session, step in result.steps.items():
            generation = self.active.get(session)
            if generation is not None:
                generation.emitted.extend(step.tokens[0])
                generation.out.put_nowait(step)
        for session, summary in result.summaries.items():
            generation = self.active.pop(session, None) or self.closes_sent.pop(session, None)
            if generation is not None:
                generation.out.put_nowait(Ended(summary))
        self._release_draft()
        if self.closing:
            self._wake.set()

    def _failed(self, exc: BaseException) -> None:
        """A round failed: its requests get the error; the next stream closes whatever it left open."""
        opened = list(self.admitted.values())
        where = f"model {self.model!r} replica {self.replica.index}"
        if isinstance(exc, (ModelUnavailable, RankFailure)):  # ranks or coordinator lost, with the caches
            self.pool.lost(self.replica, exc)
            error: ClusterError = ModelUnavailable(f"{where}: {str(exc).splitlines()[0]}")
        elif isinstance(exc, ClusterError):  # a timeout (ClusterTimeout) included: DEADLINE_EXCEEDED everywhere
            error = exc
        else:
            error = ClusterError(f"{where}: generation failed: {exc}")
            error.__cause__ = exc
        lost = [*self.active.values(), *opened]
        failed = self.router.on_lost(self, lost) if isinstance(error, ModelUnavailable) else lost
        if failed:
            log.warning("%s: %d generation(s) failed: %s", where, len(failed), str(error).splitlines()[0])
        for generation in failed:
            generation.out.put_nowait(error)
        self.active.clear()
        self.closing.clear()
        self.closes_sent.clear()
        self.admitted.clear()
        self._resync = True
        self._release_draft()
        self.router.on_stream_failed(self)


def _ignore_failure(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
