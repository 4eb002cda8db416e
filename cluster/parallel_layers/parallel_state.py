"""Tensor-parallel rank and degree of the current rank, as NxD's `parallel_state` exposes them.

Kept for API parity with the guide: layers read it once, when they are built. It is set once per
rank process by the rank worker (or per thread, for in-process ranks). Internal code takes rank and
world size as arguments instead of reading this module.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator

from cluster.parallel_layers.collectives import Collectives, ProcessGroupCollectives


@dataclass(frozen=True)
class TensorParallelState:
    rank: int
    world_size: int
    collectives: Collectives | None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"invalid tensor-parallel rank {self.rank} of {self.world_size}")


_SINGLE = TensorParallelState(0, 1, None)
_process_state: TensorParallelState | None = None
_thread_state = threading.local()


def _current() -> TensorParallelState:
    state = getattr(_thread_state, "state", None) or _process_state
    return state or _SINGLE


def initialize_model_parallel(tensor_model_parallel_size: int = 1) -> None:
    """Set this process's TP degree; its rank comes from torch.distributed when initialised."""
    global _process_state
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world != tensor_model_parallel_size:
            raise ValueError(
                f"tensor_model_parallel_size={tensor_model_parallel_size} but the process group has "
                f"{world} ranks; tpcluster runs one process group per TP group"
            )
        _process_state = TensorParallelState(dist.get_rank(), world, ProcessGroupCollectives())
    elif tensor_model_parallel_size == 1:
        _process_state = _SINGLE
    else:
        raise ValueError(
            "initialize_model_parallel(>1) needs torch.distributed to be initialised; "
            "let cluster.trace.parallel_model_trace run your model function inside the ranks"
        )


def set_rank(rank: int, world_size: int, collectives: Collectives | None) -> None:
    """Set this process's rank (called by the rank worker after forming the process group)."""
    global _process_state
    _process_state = TensorParallelState(rank, world_size, collectives)


def set_thread_rank(rank: int, world_size: int, collectives: Collectives | None) -> None:
    """Make this thread act as `rank` of `world_size` (in-process ranks, one thread each)."""
    _thread_state.state = TensorParallelState(rank, world_size, collectives)


@contextlib.contextmanager
def rank_context(rank: int, world_size: int, collectives: Collectives | None) -> Iterator[None]:
    """Act as `rank` of `world_size` in this thread only (in-process ranks)."""
    previous = getattr(_thread_state, "state", None)
    _thread_state.state = TensorParallelState(rank, world_size, collectives)
    try:
        yield
    finally:
        _thread_state.state = previous


def destroy_model_parallel() -> None:
    global _process_state
    _process_state = None


def model_parallel_is_initialized() -> bool:
    return getattr(_thread_state, "state", None) is not None or _process_state is not None


def get_tensor_model_parallel_size() -> int:
    return _current().world_size


def get_tensor_model_parallel_rank() -> int:
    return _current().rank


def get_collectives() -> Collectives:
    state = _current()
    if state.collectives is None:
        raise RuntimeError(
            f"rank {state.rank} of {state.world_size} has no collective group; "
            "models with TP > 1 run inside parallel_model_trace's ranks"
        )
    return state.collectives
