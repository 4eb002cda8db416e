"""ParallelModel: a traced TP model resident on its ranks, called like the original module."""

from __future__ import annotations

from typing import Any

import torch

from cluster.handle import CoordinatorHandle, CoordinatorInfo
from cluster.signature import TensorSpec


class ParallelModel(torch.nn.Module):
    """What parallel_model_trace and parallel_model_load return.

    `model(*inputs)` sends the inputs to the coordinator, which picks the bucket and runs every
    rank's shard; it returns what the original module returns (rank 0's outputs). `close()` frees
    the ranks (and their NeuronCores); a model is also usable as a context manager.
    """

    def __init__(self, coordinator: CoordinatorHandle) -> None:
        super().__init__()
        self._coordinator: CoordinatorHandle | None = coordinator
        self._info = coordinator.info()

    @property
    def coordinator(self) -> CoordinatorHandle:
        """The handle of the coordinator that holds this model (cluster.handle.CoordinatorHandle)."""
        if self._coordinator is None:
            from cluster.errors import ClusterError

            raise ClusterError("this ParallelModel was closed; load it again with parallel_model_load")
        return self._coordinator

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.coordinator.forward(inputs)

    @property
    def tp_degree(self) -> int:
        return self._info.tp_degree

    @property
    def backend(self) -> str:
        return self._info.backend

    @property
    def buckets(self) -> list[tuple[TensorSpec, ...]]:
        return [tuple(TensorSpec.from_json(s) for s in sig) for sig in self._info.buckets]

    def info(self) -> CoordinatorInfo:
        return self.coordinator.info()

    def close(self) -> None:
        if self._coordinator is not None:
            self._coordinator.close()
            self._coordinator = None

    def __enter__(self) -> "ParallelModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def extra_repr(self) -> str:
        return f"tp_degree={self.tp_degree}, backend={self.backend}, buckets={len(self._info.buckets)}"
