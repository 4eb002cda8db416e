"""The weights of a Hugging Face checkpoint folder: which files, their tensor shapes, their tensors.

A folder holds `model.safetensors` or `pytorch_model.bin`, or shards listed by
`model.safetensors.index.json` / `pytorch_model.bin.index.json`. Shapes come from safetensors
headers (nothing is read but the header, and the file's size is checked against it, so a truncated
file is found before any rank starts); `.bin` files are opened with `weights_only=True` and mmap.
Every error is a CheckpointError naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from cluster.errors import CheckpointError
from cluster.parallel_layers.checkpoint import check_and_assign, read_state_dict
from cluster.parallel_layers.sharding import partition_dims, split_state_dict

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
# buffers older transformers versions saved with the weights; the models here recompute them
_STALE_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint folder, in the order their index lists them."""
    folder = Path(folder)
    for name in INDEX_FILES:
        index = folder / name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{index}: not a weight index (a JSON object with a weight_map): {exc}") from exc
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise CheckpointError(f"{folder / missing[0]}: listed in {name} but missing"
                                      + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            return [folder / n for n in names]
    for name in SINGLE_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(f"{folder}: no weights found; expected one of {', '.join(SINGLE_FILES + INDEX_FILES)}")


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header; CheckpointError when the file is truncated."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated ({size} bytes): not even a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise CheckpointError(f"{path}: truncated: {size} bytes, its header alone needs {8 + length}")
        try:
            header = json.loads(file.read(length))
            entries = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((v["data_offsets"][1] for v in entries.values()), default=0)
            shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in entries.items()}
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise CheckpointError(f"{path}: not a safetensors file ({exc})") from exc
    if 8 + length + end > size:
        raise CheckpointError(f"{path}: truncated: {size} bytes, its tensors need {8 + length + end}")
    return shapes


def _bin_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated zip, or a pickle that would need code to load
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return {k: tuple(v.shape) for k, v in state.items()}


def _drop_stale(items: dict) -> dict:
    return {k: v for k, v in items.items() if not k.endswith(_STALE_SUFFIXES)}


def tensor_shapes(folder: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape across the folder's weight files (without reading the tensors)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(folder):
        shapes.update(safetensors_shapes(path) if path.suffix == ".safetensors" else _bin_shapes(path))
    return _drop_stale(shapes)


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weight files, as one state dict."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            safetensors_shapes(path)  # a truncated file is named as such, not as a parse error
        state.update(read_state_dict(path))
    return _drop_stale(state)


def rename(state: dict, strip: str = "", drop: tuple[str, ...] = ()) -> dict:
    """Keys without the prefix `strip` (where present), and without those starting with `drop`."""
    out = {}
    for key, value in state.items():
        if strip and key.startswith(strip):
            key = key[len(strip):]
        if drop and key.startswith(drop):
            continue
        out[key] = value
    return out


def compare_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str) -> None:
    """CheckpointError naming every tensor the config expects but the weights lack, hold extra, or
    hold with another shape."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshapen = [f"{k}: weights {found[k]} vs config {expected[k]}" for k in sorted(set(expected) & set(found))
                 if tuple(found[k]) != tuple(expected[k])]
    problems = []
    for what, items in (("missing tensors", missing), ("tensors the config has no place for", unexpected),
                        ("shape mismatches", misshapen)):
        if items:
            problems.append(f"{what}: {', '.join(items[:6])}" + (f", ... {len(items) - 6} more" if len(items) > 6 else ""))
    if problems:
        raise CheckpointError(f"{source}: config.json and the weights disagree; " + "; ".join(problems))


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The state dict shapes of a (meta-device, TP=1) model."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def assign_whole(model: nn.Module, state: dict[str, torch.Tensor], source: str, rank: int, world_size: int) -> None:
    """Load a whole state dict into this rank's model: parallel layers take their slices, copied
    straight from `state` (a memory-mapped checkpoint: only this rank's slices are ever read)."""
    local = split_state_dict(state, partition_dims(model), rank, world_size, views=True)
    check_and_assign(model, local, f"{source} (rank {rank} of {world_size})")


_meta_lock = threading.Lock()
_meta_users = 0
_meta_local = threading.local()
_register_parameter = nn.Module.register_parameter


def _register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _register_parameter(module, name, param)
    if param is not None and getattr(_meta_local, "active", False) and not param.is_meta:
        module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build a model without its parameters' memory or initialisation: parameters registered inside
    (in this thread) are moved to the meta device as they are made, buffers are made as usual (RoPE
    frequencies, caches, a rank's vocabulary offset). `materialize` then gives the parameters
    storage, for a checkpoint to fill."""
    global _meta_users
    with _meta_lock:
        if _meta_users == 0:
            nn.Module.register_parameter = _register_on_meta
        _meta_users += 1
    _meta_local.active = True
    try:
        yield
    finally:
        _meta_local.active = False
        with _meta_lock:
            _meta_users -= 1
            if _meta_users == 0:
                nn.Module.register_parameter = _register_parameter


def materialize(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Give `model`'s meta parameters uninitialised CPU storage, floating ones in `dtype` (a parameter
    shared by several modules stays shared)."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in made:
                kind = dtype if param.is_floating_point() else param.dtype
                made[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=kind), requires_grad=param.requires_grad)
            module._parameters[name] = made[id(param)]
    return model
