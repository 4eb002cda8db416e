"""RayRankGroup: one RankActor per rank, in one placement group packed on one node."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RaySystemError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

import numpy as np
from torch.utils._pytree import tree_leaves

from actors.rank_actor import Pickled, RankActor, from_wire, to_wire
from actors.runtime import SERVING_PROCESS_ENV, neuron_core_capacity
from actors.step_graph import StepGraph
from cluster.errors import CapacityError, RankFailure
from cluster.rank_group import RankGroup, rank_exception

_SMALL = (int, float, str, bool, type(None))
# OpenMP threads of a rank spin briefly between parallel regions, then sleep: a rank's threads fit
# its share of the node's cores, so a short spin steals nothing, while sleeping at once
# (OMP_WAIT_POLICY=PASSIVE) cost a TP=1 decode step of the shipped target 9.0 ms instead of 5.9 ms
# (2 threads, 2-core node; libgomp's default spin, 300k, gave 5.2 ms but spins ~1 ms per wait).
RANK_OPENMP_ENV = {"GOMP_SPINCOUNT": "10000"}
# An argument every rank gets is serialised once: up to this size it travels inside each call (as
# `Pickled` bytes), larger ones through the object store. A ray.put of even a small plan cost ~1.7 ms
# of the coordinator's time per fan-out here (2 actors: 3.1 ms a call with it, 1.4 ms inline), which
# was half of a TP=2 decode call's hop.
_INLINE_BYTES = 1 << 16
SPARE_ANSWER_S = 0.2  # a spare not answering a ping within this is still starting: a lost rank does not wait for it


class RayRankGroup(RankGroup):
    def __init__(self, world_size: int, placement_timeout_s: float, name: str | None = None,
                 node_ip: str | None = None, on_lost: Callable[["RayRankGroup", RankFailure], None] | None = None,
                 rank_calls: str = "auto", spares: int = 0) -> None:
        """`on_lost(group, failure)` is called, from a thread of its own, as soon as a rank's process
        dies (not at the next call to it); never after `close`. `rank_calls`: how per-step calls
        travel (`CoordinatorConfig.rank_calls`, `uses_graph`). `spares`: hot spare rank processes,
        one more bundle (NeuronCore) each in the group's placement group (`replace_lost`)."""
        self.world_size = world_size
        self._rank_calls = rank_calls
        self._graph_calls: bool | None = None  # decided when the ranks first serve (`_compile`)
        self._closed = False
        largest, total = neuron_core_capacity()
        cores = world_size + spares
        if largest < cores:
            spare = f" and {spares} spare rank(s)" if spares else ""
            raise CapacityError(
                f"tp_degree {world_size}{spare} needs {cores} NeuronCores on one node, but the largest node has "
                f"{largest} ({total} in the cluster): lower tp_degree{' or spare_ranks' if spares else ''} or add a larger node"
            )
        # named, so whoever holds the model can remove it should this group's coordinator die
        bundles: list[dict[str, float]] = [{"neuron_cores": 1} for _ in range(cores)]
        if node_ip:  # Ray's per-node resource pins the packed group to that node
            bundles[0][f"node:{node_ip}"] = 0.001
        self._pg = placement_group(bundles, strategy="STRICT_PACK", name=name or "")
        ready, _ = ray.wait([self._pg.ready()], timeout=placement_timeout_s)
        if not ready:
            remove_placement_group(self._pg)
            where = f"node {node_ip}" if node_ip else "no node"
            raise CapacityError(
                f"{where} had {cores} free NeuronCores within {placement_timeout_s:.0f} s "
                "(other models hold them): close a model (ParallelModel.close()) or add capacity"
            )
        self._actors = [self._start_rank(rank) for rank in range(world_size)]
        self._bundle = list(range(world_size))  # rank -> its bundle index (a spare that took over keeps its own)
        self._spares = [(bundle, self._start_rank(-1, bundle)) for bundle in range(world_size, cores)]
        self._steps: StepGraph | None = None  # compiled once the ranks hold their shards
        self._pids: list[int] = []
        self._on_lost = on_lost
        self._watches = [actor.watch.remote() for actor in self._actors] if on_lost is not None else []
        self._start_watch()

    def _start_rank(self, rank: int, bundle: int | None = None) -> Any:
        """A new process for `rank` (-1: a spare, warmed up), in a bundle of the group's placement group."""
        actor = RankActor.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=rank if bundle is None else bundle),
            resources={"neuron_cores": 1},
            runtime_env={"env_vars": {**RANK_OPENMP_ENV, **SERVING_PROCESS_ENV}},
        ).remote(rank, self.world_size)
        if rank < 0:
            actor.call.remote("warm_up")
        return actor

    def _start_watch(self) -> None:
        if self._on_lost is not None:
            threading.Thread(target=self._watch, args=(list(self._watches), self._on_lost), name="rank-watch",
                             daemon=True).start()

    def _watch(self, watches: list, on_lost: Callable[["RayRankGroup", RankFailure], None]) -> None:
        """Wait for the first rank's `watch` call to end: it ends only when the rank's process dies."""
        try:
            ready, _ = ray.wait(watches, num_returns=1, timeout=None)
        except Exception:  # noqa: BLE001 - Ray itself is going away: nothing to report to
            return
        if not self._closed and ready and watches == self._watches:  # not a rank replaced since
            rank = watches.index(ready[0])
            on_lost(self, RankFailure(rank, f"rank {rank}'s process died"))

    def replace_lost(self, timeout: float) -> list[int]:
        """A process for each rank whose process died, while the others keep theirs, with their
        shards: a hot spare's when one is ready, else a new one in the bundle (NeuronCore) the rank
        held. Returns the ranks replaced; [] (and changes nothing) when no rank died, when no process
        of the group answers, or when a rank does not answer within `timeout` (stuck): then the whole
        group must be replaced. The group must be formed again (`form_group`) and the new ranks
        loaded (`load(..., ranks=)`) before it serves. A spare taken is replaced by a new one, started
        now and not waited for."""
        pings = [actor.call.remote("ping") for actor in self._actors]
        spare_pings = [actor.call.remote("ping") for _, actor in self._spares]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=timeout)
        if len(ready) < len(pings):
            return []
        lost = []
        for rank, ref in enumerate(pings):
            try:
                ray.get(ref, timeout=0)
            except RayActorError:
                lost.append(rank)
            except Exception:  # noqa: BLE001 - alive but failing: not a case for keeping the others
                return []
        # a spare still starting (or warming up) stays a spare: the rank gets a new process instead
        answered, _ = ray.wait(spare_pings, num_returns=len(spare_pings), timeout=SPARE_ANSWER_S) if spare_pings else ([], [])
        spares, dead_spares = [], []
        for spare, ref in zip(self._spares, spare_pings):
            if ref in answered:
                try:
                    ray.get(ref, timeout=0)
                    spares.append(spare)
                except Exception:  # noqa: BLE001 - a spare that died or fails is replaced
                    dead_spares.append(spare)
        if not lost or len(lost) == self.world_size and not spares:  # no process of the group answers
            return []
        self._drop_steps()
        starting = [spare for spare in self._spares if spare not in spares and spare not in dead_spares]
        freed = [bundle for bundle, _ in dead_spares]
        for rank in lost:
            ray.kill(self._actors[rank], no_restart=True)
            if spares:
                freed.append(self._bundle[rank])
                self._bundle[rank], self._actors[rank] = spares.pop(0)
                ray.get(self._actors[rank].call.remote("assume_rank", rank), timeout=timeout)
            else:
                self._actors[rank] = self._start_rank(rank, self._bundle[rank])
            if self._on_lost is not None:
                self._watches[rank] = self._actors[rank].watch.remote()
        # the bundles freed (by ranks whose place a spare took, and by spares lost) hold the new spares
        kept = spares + starting
        self._spares = kept + [(bundle, self._start_rank(-1, bundle)) for bundle in freed[: len(self._spares) - len(kept)]]
        self._watches = list(self._watches)  # a new list: the old watch thread's report is stale
        self._graph_calls, self._pids = None, []  # decided again (`_compile`), with the new pids
        self._start_watch()
        return lost

    def form_group(self, timeout: float, threads: int) -> None:
        host, port = self._get([self._actors[0].rendezvous.remote()], [0], "rendezvous", timeout)[0]
        self._fan_out("init_collectives", [(host, port, timeout, threads)] * self.world_size, timeout)

    def _fan_out(self, method: str, args: Sequence[tuple], timeout: float, ranks: Sequence[int] | None = None) -> list[Any]:
        ranks = list(range(len(args))) if ranks is None else list(ranks)
        if len(args) > 1 and all(a is args[0] for a in args):
            # the same arguments for every rank: serialise each large one once
            shared = tuple(_shared(x) for x in to_wire(args[0]))
            args = [shared] * len(args)
        else:
            args = [to_wire(a) for a in args]
        refs = [self._actors[r].call.remote(method, *a) for r, a in zip(ranks, args)]
        return [from_wire(result) for result in self._get(refs, ranks, method, timeout)]

    def _get(self, refs: list, ranks: list[int], method: str, timeout: float) -> list[Any]:
        """Wait for every rank, failing fast: a dead rank is reported as soon as Ray knows, not at the timeout."""
        deadline = time.monotonic() + timeout
        rank_of = {ref: rank for ref, rank in zip(refs, ranks)}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                stalled = sorted(rank_of[ref] for ref in pending)
                raise RankFailure(stalled[0], f"{method} did not answer within {timeout:.0f} s (ranks {stalled} stalled)")
            try:
                ray.get(ready[0], timeout=0)  # raises now if this rank failed
            except RayActorError as exc:
                raise RankFailure(rank_of[ready[0]], f"the rank's process died during {method} ({type(exc).__name__})") from exc
            except RayTaskError as exc:
                cause = exc.cause if exc.cause is not None else exc
                raise rank_exception(rank_of[ready[0]], cause, str(exc)) from exc
        return ray.get(refs, timeout=0)

    # -- per-step calls through the compiled graph ------------------------------------------
    def load(self, backend: str, graphs: Sequence[list[bytes]], weights: Sequence[dict | None], threads: int,
             aliases: dict[str, int], timeout: float, ranks: Sequence[int] | None = None) -> None:
        super().load(backend, graphs, weights, threads, aliases, timeout, ranks)
        self._compile(timeout)

    def run(self, call: Any, timeout: float) -> Any:
        return self._serve("run", (call,), timeout)

    def describe(self, timeout: float) -> list[dict[str, Any]]:
        infos = super().describe(timeout)
        if self._graph_calls is not None:  # once decided: how the per-step calls reach the ranks
            for info in infos:
                info["rank_calls"] = "graph" if self._graph_calls else "actor"
        return infos

    def describe_spares(self, timeout: float) -> list[dict[str, Any]]:
        """`describe` of each spare that answers within SPARE_ANSWER_S (at most `timeout`): one still
        starting is left out rather than waited for (a caller may hold the coordinator's call lock)."""
        refs = [actor.call.remote("describe") for _, actor in self._spares]
        wait = min(timeout, SPARE_ANSWER_S)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=wait) if refs else ([], [])
        out = []
        for ref in refs:
            if ref in ready:
                try:
                    out.append(ray.get(ref, timeout=0))
                except Exception:  # noqa: BLE001 - a dead spare is replaced at the next loss
                    pass
        return out

    def _compile(self, timeout: float) -> None:
        if self._graph_calls is None:
            infos = self.describe(timeout)
            self._pids = [info["pid"] for info in infos]
            self._graph_calls = uses_graph(self._rank_calls, infos[0].get("backend", ""))
        if self._graph_calls and self._steps is None:
            self._steps = StepGraph(self._actors, timeout)

    def _serve(self, method: str, args: tuple, timeout: float) -> Any:
        self._compile(timeout)
        if not self._graph_calls:
            return self._fan_out(method, [args] * self.world_size, timeout)[0]
        try:
            return self._steps.run(method, args, timeout)[0]
        except RayTaskError as exc:  # raised inside a rank; the graph goes on serving
            pid = getattr(exc, "pid", None)
            rank = self._pids.index(pid) if pid in self._pids else 0
            cause = exc.cause if exc.cause is not None else exc
            if isinstance(cause, RankFailure):  # a rank saw its peer die in a collective
                self._drop_steps()
                raise cause from exc
            raise rank_exception(rank, cause, str(exc)) from exc
        except (RayActorError, RaySystemError, GetTimeoutError, TimeoutError) as exc:
            self._drop_steps()  # a lost or stalled rank leaves the graph unusable
            rank = self._first_lost_rank()
            raise RankFailure(rank, f"rank {rank} failed during {method} ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc

    def _first_lost_rank(self) -> int:
        pings = [actor.call.remote("ping") for actor in self._actors]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=1.0)
        for rank, ref in enumerate(pings):
            if ref not in ready:
                return rank
            try:
                ray.get(ref, timeout=0)
            except Exception:  # noqa: BLE001 - dead: this is the one
                return rank
        return 0

    def _drop_steps(self) -> None:
        steps, self._steps = self._steps, None
        if steps is not None:
            steps.close(timeout=5.0)

    def close(self) -> None:
        self._closed = True
        self._drop_steps()
        for actor in self._actors + [actor for _, actor in self._spares]:
            ray.kill(actor, no_restart=True)
        self._actors, self._spares = [], []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None


def uses_graph(rank_calls: str, backend: str) -> bool:
    """Whether a replica's per-step calls go through a compiled graph (`StepGraph`) rather than as
    ordinary actor calls. "auto": not on the host backends (cpu, eager), where the model computes on
    the node's own cores: a compiled graph's readers wait by spinning (Ray 2.60 polls its shared-memory
    channels with sched_yield), so the coordinator burns a core for the whole of every rank call and
    each idle rank burns one between calls (measured here: 51 ms of CPU for a 50 ms call, 2.0 s of CPU
    per rank over 2 idle seconds), and on a 2-core node that is the ranks' compute: TP=2 decode of
    the shipped target 75-100 tok/s through the graph against 118-129 tok/s with actor calls, TP=1
    about the same. On a device backend the host cores only wait, and the graph's hop is the shorter."""
    if rank_calls == "auto":
        return backend not in ("cpu", "eager")
    return rank_calls == "graph"


def _shared(value: Any) -> Any:
    """One argument that every rank gets, serialised once: as it is when small and plain, as `Pickled`
    bytes when small, else a reference into the object store."""
    if isinstance(value, _SMALL):
        return value
    leaves = tree_leaves(value)
    size = sum(x.nbytes if isinstance(x, np.ndarray) else len(x) if isinstance(x, (bytes, str)) else 0 for x in leaves)
    if size > _INLINE_BYTES:  # weights, graph files
        return ray.put(value)
    if leaves and all(isinstance(x, np.ndarray) for x in leaves):
        return value  # Ray sends small arrays inside the call without pickling them
    blob = ray.cloudpickle.dumps(value)
    return Pickled(blob) if len(blob) <= _INLINE_BYTES else ray.put(value)


def remove_orphaned_group(name: str) -> bool:
    """Remove the placement group `name` (its coordinator died): its NeuronCores go back to the cluster."""
    try:
        group = ray.util.get_placement_group(name)
    except ValueError:  # already gone
        return False
    remove_placement_group(group)
    return True
