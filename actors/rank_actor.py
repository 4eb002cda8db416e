"""The Ray actor that hosts one rank: a thin shell over cluster.rank.RankWorker."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import ray
import torch
from torch.utils._pytree import tree_map

from cluster.rank import RankWorker


#: the rank calls on every generated token, sent through a Ray Compiled Graph (actors.rank_group)
SERVING_METHODS = ("run",)
#: the compiled graph's first execution, run when it is compiled (actors.step_graph)
WARM_UP = "warm-up"


def to_wire(value: Any) -> Any:
    """Tensors in (nested tuples, lists, dicts of) a call's arguments or result as numpy arrays:
    Ray moves those without a copy through pickle5 buffers, while a torch tensor goes through
    torch.save (~0.5 ms a step on these machines). Other values pass as they are."""
    return tree_map(lambda x: x.detach().numpy() if isinstance(x, torch.Tensor) and x.dtype != torch.bfloat16 else x, value)


class Pickled:
    """An argument serialised once by its sender for every rank it goes to (actors.rank_group). Not a
    bytes subclass: Ray's msgpack path would send that as plain bytes."""

    __slots__ = ("blob",)

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def __reduce__(self) -> tuple:
        return Pickled, (self.blob,)


def from_wire(value: Any) -> Any:
    """The inverse of to_wire: arrays back into (writable, owned) tensors, `Pickled` arguments unpickled."""
    def back(x: Any) -> Any:
        if isinstance(x, Pickled):
            return ray.cloudpickle.loads(x.blob)
        return torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else x
    return tree_map(back, value)


# Rank calls run one at a time (the default group); `watch` has a thread of its own, and the
# compiled graph runs on Ray's system group.
@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=1, concurrency_groups={"watch": 1})
class RankActor:
    def __init__(self, rank: int, world_size: int) -> None:
        self._worker = RankWorker(rank, world_size, node=ray.util.get_node_ip_address())

    @ray.method(concurrency_group="watch")
    def watch(self) -> int:
        """Never answers while the rank lives: its owner learns of the process's death from this
        call failing, the moment Ray sees it, without a call or poll of its own (RayRankGroup)."""
        threading.Event().wait()
        return self._worker.rank

    def call(self, method: str, *args: Any) -> Any:
        return to_wire(getattr(self._worker, method)(*from_wire(args)))

    def serve(self, request: tuple[str, tuple]) -> Any:
        """A per-step call (one of SERVING_METHODS) arriving through the replica's compiled graph."""
        method, args = request
        if method == WARM_UP:
            return self._worker.ping()
        if method not in SERVING_METHODS:
            raise ValueError(f"{method} is not a per-step rank call")
        return to_wire(getattr(self._worker, method)(*from_wire(args)))

    def rendezvous(self) -> tuple[str, int]:
        return self._worker.pick_rendezvous(ray.util.get_node_ip_address())
