"""The one seam where parallel layers talk to the other ranks.

`ProcessGroupCollectives` uses torch's functional collectives on the default process group, so
torch.export captures them in the traced graph. `ThreadCollectives` runs ranks as threads of one
process (unit tests and the in-process rank group): same arithmetic, no sockets.
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch


class Collectives(Protocol):
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor: ...


class ProcessGroupCollectives:
    """Functional collectives over torch.distributed's default group (gloo on CPU).

    On gloo, all_reduce costs 2-6x an all_gather of the same tensor on these machines (see
    FIELD-NOTES), so small reductions are done as an all_gather and a sum in rank order: the same
    bits on every rank, and the same arithmetic as ThreadCollectives.
    """

    #: tensors up to this many elements are reduced by gather-and-sum
    gather_reduce_max_elements = 1 << 16

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        if tensor.numel() <= self.gather_reduce_max_elements:
            parts = funcol.all_gather_tensor(tensor.contiguous().unsqueeze(0), 0, dist.group.WORLD)
            total = parts[0]
            for i in range(1, parts.shape[0]):
                total = total + parts[i]
            return total
        return funcol.all_reduce(tensor, "sum", dist.group.WORLD)

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        return funcol.all_gather_tensor(tensor.contiguous(), dim % tensor.dim(), dist.group.WORLD)


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
