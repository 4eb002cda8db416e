"""What a replica's coordinator does when a rank is lost (cluster.coordinator.Coordinator is one).

A serving call that finds a rank dead or failing, or the rank group's own watch of its processes,
breaks the replica: the loss is pushed to every `watch_health` caller at once, and a rebuild thread
brings the replica back (a new process for each lost rank beside the ranks that live, where the
backend allows it, else a whole new group; then a new rendezvous and the shards loaded again from
what the replica was loaded with: its files, which each new rank maps itself). Retried with backoff
until it serves; `rebuild_phases` says where the last rebuild's time went. Hot spare rank
processes, where the rank group keeps them, stand in for lost ranks (`describe_spares`).

Of the coordinator it reads `ranks` (and replaces it), `config`, `state`, `_threads()`, and
`generation` (cluster.generation_service: its sessions are dropped with the caches); `_payload`
is what `load` loaded the ranks from.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from cluster.errors import ModelUnavailable, RankError, RankFailure
from cluster.rank_group import RankGroup
from cluster.trace.backends import keeps_survivors


class Recovery:
    """Failure and recovery of a replica's rank group (see the module docstring)."""

    def __init__(self, rank_group_factory: Callable[[], RankGroup] | None) -> None:
        self._factory = rank_group_factory
        # (graphs, weights, draft) the ranks were loaded from, to load a replacement rank: a served
        # model's weights are its files (artifact.WeightFile), which the new rank maps itself, not tensors
        self._payload: tuple | None = None
        self._compiled_buckets: list[int] | None = None  # the buckets compile_graphs was asked for (None: all)
        self._broken: str | None = None
        self._rebuilding: threading.Thread | None = None
        self._failing = threading.Lock()  # a serving call and the rank watch may both see a loss
        self._health = threading.Condition()  # notified on every change of `_broken` (watch_health)
        self._health_version = 0
        self._rebuild_phases: dict[str, float] = {}
        self._in_serving = threading.local()  # this thread is inside `_serving` (its `active`)
        self.rebuilds = 0

    def _check_serving(self) -> None:
        """ModelUnavailable while the replica is broken (it is rebuilding)."""
        if self._broken is not None:
            raise ModelUnavailable(f"replica unavailable ({self._broken}); it is rebuilding, retry shortly")

    def _serving(self, call: Callable[[], Any]) -> Any:
        """Run a call on the ranks; a lost or failing rank breaks the replica and starts its rebuild.

        Re-entrant: a call made inside another on the same thread (each of a generation step's calls
        to the ranks, through `run`) is refused while the replica is broken, but its failure is
        reported by the outermost call alone, so the error says once that the replica is rebuilding.
        """
        self._check_serving()
        if getattr(self._in_serving, "active", False):
            return call()
        self._in_serving.active = True
        try:
            return call()
        except RankError as exc:  # peers may be stuck in a collective with it: the group is unusable
            self._fail(exc)
            raise RankFailure(exc.rank, f"{exc.message}; the replica is rebuilding") from exc
        finally:
            self._in_serving.active = False

    def rank_lost(self, ranks: RankGroup, exc: Exception) -> None:
        """A rank of `ranks` died, seen by the group's own watch rather than a call: the replica breaks
        (and starts its rebuild) at once, even while idle. A group already replaced is ignored."""
        if ranks is self.ranks:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        with self._failing:
            if self._broken is None:
                self._set_broken(str(exc).split("\n", 1)[0])
            self.generation.drop()  # the caches are gone with the ranks
            if self._factory is not None and self._payload is not None and self._rebuilding is None:
                self._rebuilding = threading.Thread(target=self._rebuild, name="rebuild", daemon=True)
                self._rebuilding.start()

    def _set_broken(self, reason: str | None) -> None:
        with self._health:
            self._broken = reason
            self._health_version += 1
            self._health.notify_all()

    def watch_health(self, version: int, wait_s: float) -> tuple[int, str | None]:
        """(version, why the replica is not serving or None) as soon as the version differs from
        `version`, else after `wait_s`: a watcher learns of a loss and of the replica's return the
        moment they happen (-1: the current state at once)."""
        with self._health:
            self._health.wait_for(lambda: self._health_version != version, timeout=wait_s)
            return self._health_version, self._broken

    def _rebuild(self) -> None:
        """Bring the replica back: a new process for each rank that died, beside the ranks that live
        and keep their shards (`_replace_lost`), else a whole new group; then the group formed again
        and the new ranks loaded. Retried with backoff (whole groups only) until it serves."""
        delays = self.config.rebuild_backoff.delays()
        whole = False  # after a failed attempt, the whole group is replaced
        while True:
            phases, mark = {}, time.perf_counter()

            def phase(name: str) -> None:
                nonlocal mark
                now = time.perf_counter()
                phases[name] = round(now - mark, 3)
                mark = now

            lost: list[int] = []
            try:
                lost = [] if whole else self._replace_lost()
                if lost:
                    phase("replace")
                else:
                    self.ranks.close()
                    phase("close")
                    self.ranks = self._factory()
                    phase("placement")
                self.ranks.form_group(self.config.rendezvous_timeout_s, self._threads())
                phase("rendezvous")
                graphs, weights, draft = self._payload
                only = lost or None
                self.ranks.load(self.state.backend, graphs, weights, self._threads(), self.state.io_aliases,
                                self.config.trace_timeout_s, ranks=only)
                phase("load")
                if draft is not None:
                    self.ranks.load_draft(draft[1], draft[2], draft[0].io_aliases, self.config.trace_timeout_s,
                                          ranks=only)
                    phase("draft")
                if self.config.compile_graphs:  # the packages are cached on this machine: the new ranks load them
                    self.ranks.compile_graphs(self._compiled_buckets, self.config.trace_timeout_s)
                    phase("compiled graphs")
                self.rebuilds += 1
                self._rebuild_phases = phases
                with self._failing:  # a loss from now on starts a new rebuild
                    self._rebuilding = None
                    self._set_broken(None)
                return
            except Exception as exc:  # keep trying: capacity may come back
                self._set_broken(f"rebuild failed: {str(exc).splitlines()[0]}")
                if not lost:  # else the whole group, at once
                    time.sleep(next(delays))
                whole = True

    def _replace_lost(self) -> list[int]:
        """New processes for the ranks that died, where the group and backend allow keeping the
        others (`RayRankGroup.replace_lost`, `Backend.keeps_survivors`): the ranks replaced, or []."""
        replace = getattr(self.ranks, "replace_lost", None)
        if replace is None or not keeps_survivors(self.state.backend):
            return []
        return replace(self.config.health_timeout_s)

    def describe_spares(self) -> list[dict[str, Any]]:
        """The hot spare rank processes (`CoordinatorConfig.spare_ranks`) that answer now: pid, node, cores."""
        spares = getattr(self.ranks, "describe_spares", None)
        return spares(self.config.health_timeout_s) if spares is not None else []

    def rebuild_phases(self) -> dict[str, float]:
        """Seconds in each step of the last completed rebuild: close, placement (a whole new group) or
        replace (new processes for the ranks lost only), then rendezvous, load, draft."""
        return dict(self._rebuild_phases)


__all__ = ["Recovery"]
