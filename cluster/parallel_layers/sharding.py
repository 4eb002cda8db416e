"""Pure functions that slice whole tensors into per-rank shards and back."""

from __future__ import annotations

import torch
from torch import nn

from cluster.errors import ShardingError


def divide(numerator: int, world_size: int, what: str) -> int:
    """numerator / world_size, or a ShardingError naming `what` when it does not divide."""
    if numerator % world_size:
        raise ShardingError(
            f"{what}: size {numerator} does not divide by tp_degree {world_size}; "
            f"pick a tp_degree that divides {numerator}"
        )
    return numerator // world_size


def shard_view(full: torch.Tensor, rank: int, world_size: int, dim: int) -> torch.Tensor:
    """Rank `rank`'s slice of `full` along `dim`, as a view of it (no copy)."""
    size = divide(full.shape[dim], world_size, f"tensor of shape {tuple(full.shape)} along dim {dim}")
    return full.narrow(dim, rank * size, size)


def shard_tensor(full: torch.Tensor, rank: int, world_size: int, dim: int) -> torch.Tensor:
    """Rank `rank`'s contiguous slice of `full` along `dim` (NxD's create_local_weight)."""
    return shard_view(full, rank, world_size, dim).clone()


def unshard_tensors(shards: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Inverse of shard_tensor over all ranks."""
    return torch.cat(shards, dim=dim)


def partition_dims(model: nn.Module) -> dict[str, int]:
    """State-dict key -> the dim along which it is split across ranks, for every parallel layer.

    Keys not listed are replicated: every rank holds the whole tensor.
    """
    dims: dict[str, int] = {}
    for prefix, module in model.named_modules():
        for name, dim in getattr(module, "partition_dims", {}).items():
            dims[f"{prefix}.{name}" if prefix else name] = dim
    return dims


def split_state_dict(
    full: dict[str, torch.Tensor], dims: dict[str, int], rank: int, world_size: int, views: bool = False
) -> dict[str, torch.Tensor]:
    """Rank `rank`'s state dict from a whole one: partitioned keys sliced, the rest shared. With
    `views` the slices are views of `full` (for copying into a model: no second copy of the shard)."""
    cut = shard_view if views else shard_tensor
    return {key: cut(value, rank, world_size, dims[key]) if key in dims else value for key, value in full.items()}
