"""Tensor-parallel layers, parallel state and checkpoint loading (neuronx_distributed.parallel_layers)."""

from cluster.parallel_layers import layers, parallel_state
from cluster.parallel_layers.checkpoint import load, save_sharded
from cluster.parallel_layers.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear

__all__ = [
    "ColumnParallelLinear",
    "ParallelEmbedding",
    "RowParallelLinear",
    "layers",
    "load",
    "parallel_state",
    "save_sharded",
]
