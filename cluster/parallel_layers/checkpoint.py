"""Loading whole or per-rank checkpoints into a (tensor-parallel) model, and writing shards.

Whole checkpoints may be `{"model": state_dict}` (as the guide saves them), a bare state dict, or a
.safetensors file. Per-rank checkpoints are a folder with one `tp_rank_XX` entry per rank (a file,
or a folder holding one checkpoint file), as TP training writes them. torch files are read with
`weights_only=True`: nothing that can run code is unpickled.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from cluster.errors import CheckpointError
from cluster.parallel_layers import parallel_state
from cluster.parallel_layers.sharding import partition_dims, split_state_dict

_RANK_ENTRY = re.compile(r"tp_rank_(\d+)")
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of one checkpoint file, unwrapping {"model": ...}; CheckpointError names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or a pickle that needs code to load
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors (nor {{'model': state_dict}})")
    return state


def find_rank_file(folder: str | os.PathLike, rank: int, world_size: int) -> Path:
    """The checkpoint file of `rank` in a folder of tp_rank_XX entries; checks the shard count."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"sharded checkpoint {folder} is not a folder of tp_rank_XX files")
    entries: dict[int, Path] = {}
    for entry in folder.iterdir():
        match = _RANK_ENTRY.search(entry.name)
        if match:
            entries[int(match.group(1))] = entry
    if sorted(entries) != list(range(world_size)):
        raise CheckpointError(
            f"sharded checkpoint {folder} has shards for ranks {sorted(entries)}, "
            f"but the model runs at tp_degree {world_size}: reshard it or load the whole checkpoint"
        )
    entry = entries[rank]
    if entry.is_dir():
        files = sorted(p for p in entry.iterdir() if p.suffix in _CHECKPOINT_SUFFIXES)
        if len(files) != 1:
            raise CheckpointError(f"{entry} should hold exactly one checkpoint file, found {[p.name for p in files]}")
        entry = files[0]
    return entry


def check_and_assign(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`, or raise CheckpointError naming every missing/unexpected/misshapen key."""
    expected = model.state_dict()
    # buffers the model keeps out of its state dict (position_ids, ...) but older checkpoints carry
    transient = {name for name, _ in model.named_buffers()} - set(expected)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - transient)
    misshapen = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if misshapen:
        problems.append(f"shape mismatches {_few(misshapen)}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key])


def _few(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... {len(items) - limit} more' if len(items) > limit else ''}]"


def load(path: str | os.PathLike, model: nn.Module, sharded: bool = False) -> None:
    """Load a checkpoint into `model` for this process's TP rank (NxD's parallel_layers.load).

    sharded=False: a whole checkpoint; each parallel layer takes its slice.
    sharded=True: a folder of per-rank checkpoints; this rank takes its own.
    """
    rank = parallel_state.get_tensor_model_parallel_rank()
    world = parallel_state.get_tensor_model_parallel_size()
    if sharded:
        file = find_rank_file(path, rank, world)
        check_and_assign(model, read_state_dict(file), str(file))
        return
    full = read_state_dict(path)
    dims = partition_dims(model)
    try:
        local = split_state_dict(full, dims, rank, world)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be split for tp_degree {world}: {exc}") from exc
    check_and_assign(model, local, f"{path} (rank {rank} of {world})")


def save_sharded(
    state: dict[str, torch.Tensor], model: nn.Module, folder: str | os.PathLike, tp_degree: int
) -> list[Path]:
    """Write a whole state dict as tp_rank_XX.safetensors shards for `model`'s parallel layers.

    `model` may be built at any rank of `tp_degree` (only which keys split along which dim is read).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dims = partition_dims(model)
    paths = []
    for rank in range(tp_degree):
        local = {k: v.contiguous() for k, v in split_state_dict(state, dims, rank, tp_degree).items()}
        path = folder / f"tp_rank_{rank:02d}.safetensors"
        save_file(local, str(path))
        paths.append(path)
    return paths
