"""RayRankGroup: one RankActor per rank, in one placement group packed on one node."""

from __future__ import annotations

import time
from typing import Any, Sequence

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

import numpy as np
from torch.utils._pytree import tree_leaves

from actors.rank_actor import RankActor, from_wire, to_wire
from actors.runtime import SERVING_PROCESS_ENV, neuron_core_capacity
from cluster.errors import CapacityError, RankFailure
from cluster.rank_group import RankGroup, rank_exception

_SMALL = (int, float, str, bool, type(None))
_INLINE_BYTES = 1 << 16  # arguments up to this size travel inside the call; larger ones through the object store


class RayRankGroup(RankGroup):
    def __init__(self, world_size: int, placement_timeout_s: float, name: str | None = None,
                 node_ip: str | None = None) -> None:
        self.world_size = world_size
        largest, total = neuron_core_capacity()
        if largest < world_size:
            raise CapacityError(
                f"tp_degree {world_size} needs {world_size} NeuronCores on one node, but the largest node has "
                f"{largest} ({total} in the cluster): lower tp_degree or add a larger node"
            )
        # named, so whoever holds the model can remove it should this group's coordinator die
        bundles: list[dict[str, float]] = [{"neuron_cores": 1} for _ in range(world_size)]
        if node_ip:  # Ray's per-node resource pins the packed group to that node
            bundles[0][f"node:{node_ip}"] = 0.001
        self._pg = placement_group(bundles, strategy="STRICT_PACK", name=name or "")
        ready, _ = ray.wait([self._pg.ready()], timeout=placement_timeout_s)
        if not ready:
            remove_placement_group(self._pg)
            where = f"node {node_ip}" if node_ip else "no node"
            raise CapacityError(
                f"{where} had {world_size} free NeuronCores within {placement_timeout_s:.0f} s "
                "(other models hold them): close a model (ParallelModel.close()) or add capacity"
            )
        self._actors = [
            RankActor.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=rank),
                resources={"neuron_cores": 1},
                # ranks that share a host's cores must not spin-wait in OpenMP while a peer computes
                runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", **SERVING_PROCESS_ENV}},
            ).remote(rank, world_size)
            for rank in range(world_size)
        ]

    def form_group(self, timeout: float, threads: int) -> None:
        host, port = self._get([self._actors[0].rendezvous.remote()], [0], "rendezvous", timeout)[0]
        self._fan_out("init_collectives", [(host, port, timeout, threads)] * self.world_size, timeout)

    def _fan_out(self, method: str, args: Sequence[tuple], timeout: float, ranks: Sequence[int] | None = None) -> list[Any]:
        ranks = list(range(len(args))) if ranks is None else list(ranks)
        if len(args) > 1 and all(a is args[0] for a in args):
            # the same arguments for every rank: serialise each large one once
            shared = tuple(x if _inline(x) else ray.put(x) for x in to_wire(args[0]))
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

    def close(self) -> None:
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None


def _inline(value: Any) -> bool:
    if isinstance(value, _SMALL):
        return True
    arrays = [x for x in tree_leaves(value) if isinstance(x, np.ndarray)]
    return bool(arrays) and len(arrays) == len(tree_leaves(value)) and sum(a.nbytes for a in arrays) <= _INLINE_BYTES


def remove_orphaned_group(name: str) -> bool:
    """Remove the placement group `name` (its coordinator died): its NeuronCores go back to the cluster."""
    try:
        group = ray.util.get_placement_group(name)
    except ValueError:  # already gone
        return False
    remove_placement_group(group)
    return True
