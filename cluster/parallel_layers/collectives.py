"""The one seam where parallel layers talk to the other ranks.

`ProcessGroupCollectives` calls one custom op, `tpcluster::all_gather`, which torch.export
captures in the traced graph; what carries it is set per process (`use_gather`): shared memory
between the ranks of one node (`cluster.parallel_layers.shared_memory`), gloo between nodes.
`ThreadCollectives` runs ranks as threads of one process (unit tests and the in-process rank
group): same arithmetic, no sockets.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import torch


class Collectives(Protocol):
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor: ...


class Gather(Protocol):
    world_size: int

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[world_size, *tensor.shape]: every rank's tensor in rank order."""


class GlooGather:
    """The all-gather over torch.distributed's default group (gloo on CPU): between nodes, and the fallback."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = torch.empty((self.world_size, *tensor.shape), dtype=tensor.dtype)
        dist.all_gather(list(out.unbind(0)), tensor.contiguous())
        return out


_process_gather: Gather | None = None


def use_gather(gather: Gather | None) -> None:
    """Set how this rank process exchanges tensors with its peers (set once the group is formed)."""
    global _process_gather
    _process_gather = gather


def process_gather() -> Gather:
    if _process_gather is not None:
        return _process_gather
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return GlooGather(dist.get_world_size())
    raise RuntimeError("this process has no collective group; models with TP > 1 run inside parallel_model_trace's ranks")


@torch.library.custom_op("tpcluster::all_gather", mutates_args=())
def all_gather_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor`, stacked in rank order: [world_size, *tensor.shape].

    One op in the traced graph whatever carries it: shared memory between the ranks of one node,
    gloo otherwise (`use_gather`). Saved graphs name the op, not the transport.
    """
    started = time.perf_counter()
    try:
        return process_gather().gather(tensor)
    finally:
        _spent[0] += time.perf_counter() - started
        _spent[1] += 1


_spent = [0.0, 0]  # seconds in this process's collectives, and how many


def collective_time(reset: bool = False) -> tuple[float, int]:
    """(seconds, count) of this process's collectives since the last reset (the benchmark's breakdown)."""
    spent = (_spent[0], _spent[1])
    if reset:
        _spent[:] = [0.0, 0]
    return spent


@all_gather_ranks.register_fake
def _(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.new_empty((process_gather().world_size, *tensor.shape))


class ProcessGroupCollectives:
    """Collectives of a rank process: one traced op (`tpcluster::all_gather`), then arithmetic.

    A reduction is an all-gather and a sum in rank order: the same bits on every rank, and the
    same arithmetic as ThreadCollectives. (On gloo all_reduce also costs 2-6x an all_gather of the
    same tensor on these machines: see FIELD-NOTES.) Graphs saved by earlier releases hold torch's
    functional collectives on the default group instead; they still run, over gloo.
    """

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = torch.ops.tpcluster.all_gather(tensor)
        total = parts[0]
        for i in range(1, parts.shape[0]):
            total = total + parts[i]
        return total

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        parts = torch.ops.tpcluster.all_gather(tensor)
        return torch.cat(list(parts.unbind(0)), dim=dim % tensor.dim())


class ThreadCollectives:
    """Collectives between `world_size` threads of one process; `for_rank(r)` gives rank r's view.

    Results are summed in rank order, so every rank sees bit-identical values, as with gloo.
    """

    def __init__(self, world_size: int, timeout_s: float = 60.0) -> None:
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout_s)
        self._slots: list[torch.Tensor | None] = [None] * world_size

    def for_rank(self, rank: int) -> "_ThreadRankView":
        return _ThreadRankView(self, rank)

    def exchange(self, rank: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self._slots[rank] = tensor
        self._barrier.wait()
        parts = list(self._slots)
        self._barrier.wait()  # nobody overwrites a slot before everyone has read it
        return parts  # type: ignore[return-value]


class _ThreadRankView:
    def __init__(self, group: ThreadCollectives, rank: int) -> None:
        self._group = group
        self._rank = rank

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = self._group.exchange(self._rank, tensor)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat(self._group.exchange(self._rank, tensor), dim=dim)
