"""Generate across the replicas of one served decoder model: the router above its schedulers.

Each replica has a scheduler (actors.gateway.scheduling) that batches the generations queued on
it. The router makes the choices that span replicas: a new generation joins the least loaded
ready replica; the generations of a lost replica go on on another; a speculating batch of another
model borrows one of this model's replicas as its draft.

A replica lost mid-generation costs its streams nothing when another replica is ready: each of its
generations goes on there (`Generation.carried_on`: the prompt plus the tokens already streamed,
prefilled, then the same rounds), so the client's stream continues without a gap, with the same
greedy tokens, and a seeded sampled one with the same tokens too (each round's random draws come
from the sequence's seed and length, cluster.generation.engine).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from actors.gateway.scheduling import Generation, ReplicaScheduler
from cluster.errors import ClusterError

if TYPE_CHECKING:
    from actors.gateway.pool import ReplicaPool

log = logging.getLogger("tpcluster.gateway")


class GenerationRouter:
    """The schedulers of one decoder model's replicas (`capacity` sequences each) and the choices
    above them. `max_prompt` bounds the prompt a carried-on generation prefills; an `encoder_decoder`
    model carries on only generations that streamed nothing yet. `record_batch(rows)` counts a
    round's sequences, `record_carried_on()` one generation carried on."""

    def __init__(self, model: str, pool: ReplicaPool, capacity: int, max_prompt: int, encoder_decoder: bool,
                 record_batch: Callable[[int], None], record_carried_on: Callable[[], None]) -> None:
        self.model = model  # the model's name
        self.pool = pool
        self.max_prompt = max_prompt
        self.encoder_decoder = encoder_decoder
        self._record_carried_on = record_carried_on
        self.schedulers = [ReplicaScheduler(model, replica, capacity, pool, self, record_batch)
                           for replica in pool.replicas]

    @property
    def waiting(self) -> int:
        """Generations queued for a slot, on every replica."""
        return sum(len(s.waiting) for s in self.schedulers)

    def route(self, generation: Generation) -> ReplicaScheduler:
        """Queue a generation on the least loaded ready replica (not one lent out as a draft)."""
        ready = [s for s in self.schedulers if s.replica.ready and s.lent_to is None] or \
            [s for s in self.schedulers if s.replica.ready]
        if not ready:
            error = self.pool.unavailable()
            generation.out.put_nowait(error)
            raise error
        scheduler = min(ready, key=lambda s: s.load)
        scheduler.submit(generation)
        return scheduler

    # -- a replica lost ---------------------------------------------------------------------
    def on_lost(self, scheduler: ReplicaScheduler, generations: list[Generation]) -> list[Generation]:
        """Send the generations `scheduler`'s replica lost to a ready replica, each from where its
        stream is (see `Generation.carried_on`); with none ready, they wait on `scheduler` for its
        replica's rebuild (bounded by their deadlines). Returns those that cannot go on."""
        elsewhere = self._any_ready()
        left = []
        for generation in generations:
            # an encoder-decoder's streamed tokens are not a prompt to re-prefill: only an unstarted one goes on
            started = self.encoder_decoder and generation.emitted
            request = None if started else generation.carried_on(self.max_prompt)
            if request is None:
                left.append(generation)
                continue
            generation.request, generation.session, generation.emitted = request, None, []
            self._record_carried_on()
            log.info("model %s replica %d: a generation goes on %s after %d streamed token(s)", self.model,
                     scheduler.replica.index, "on another replica" if elsewhere else "once it is rebuilt",
                     request.resumed)
            if not elsewhere:
                scheduler.submit(generation)  # admitted once the replica is back (the pool wakes the scheduler)
                continue
            try:
                self.route(generation)
            except ClusterError:  # no replica after all: `route` handed the generation the error
                continue
        return left

    def on_stream_failed(self, scheduler: ReplicaScheduler) -> None:
        """A failed stream left `scheduler` empty: when its replica is out of rotation, its waiting
        generations go to another replica; with no replica ready they wait there for the rebuild,
        each up to its deadline."""
        if not scheduler.replica.ready and self._any_ready():
            for generation in scheduler.take_waiting():
                self.route(generation)

    def _any_ready(self) -> bool:
        return any(s.replica.ready for s in self.schedulers)

    # -- lending draft replicas -------------------------------------------------------------
    def lend(self, borrower: ReplicaScheduler) -> ReplicaScheduler | None:
        """A replica of this (draft) model for `borrower`'s batch: ready, not lent already, with no
        sequences of its own; it serves none of its own until `borrower` gives it back (`take_back`).
        None when no replica is free."""
        for candidate in self.schedulers:
            if candidate.replica.ready and candidate.lent_to is None and not candidate.busy:
                candidate.lent_to = borrower
                return candidate
        return None

    def take_back(self, lender: ReplicaScheduler) -> None:
        """`lender` is back from the batch it served as a draft: its own waiting generations may start."""
        lender.lent_to = None
        if lender.waiting:
            lender.wake()

    async def close(self) -> None:
        for scheduler in self.schedulers:
            await scheduler.close()
