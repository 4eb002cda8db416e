"""The saved-model folder: a manifest, graph files, and weights in safetensors.

    manifest.json                 format version, tp_degree, backend, buckets, files + sha256, versions
    graphs/bucket_BB_<sha>.graph  one file per distinct graph (ranks that share a graph share the file)
    weights/shared.safetensors    weights identical on every rank, stored once (separated mode)
    weights/rank_RR.safetensors   each rank's own slices (separated mode)
    bucket_kernel.pt              the TorchScript bucket kernel, when the model has buckets

Loading checks every file it reads against the manifest (present, size, sha256) and ignores files
the manifest does not name. Nothing is unpickled: graphs and weights are safetensors (cpu backend),
the kernel is TorchScript loaded with torch.jit.load.

Weights are read where they are used: `read(path, mapped=True)` names each rank's weight files
(`WeightFile`: path, size, sha256) instead of reading them, and the rank opens its own files with
`load_weights`, memory-mapped, and copies each tensor once into its own memory (a mat-vec over
mapped bf16 weights ran 15-25% slower here than over the same weights in anonymous memory: page
cache pages are 4 KiB, unaligned to the kernels' 64 bytes). So a replica holds its weights once, in
its ranks, and no process between the folder and the ranks (gateway, coordinator, Ray's object
store) ever holds a copy. Files are written to a temporary name and renamed into place, so a model saved
again over a folder never changes the bytes under a rank that maps the old files.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from cluster.errors import ArtifactError
from cluster.signature import TensorSpec
from cluster.trace.state import Exported, ModelState

FORMAT = "tpcluster-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("tpcluster")
    except PackageNotFoundError:
        ours = "unknown"
    return {"tpcluster": ours, "torch": torch.__version__, "python": platform.python_version()}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class WeightFile:
    """One safetensors file of a rank's weights, as the manifest lists it: what a rank needs to open
    and check it itself (`load_weights`)."""

    path: str  # absolute
    sha256: str
    bytes: int


def _file_sha256(path: Path) -> str:
    """A file's sha256, read in blocks (no copy of the file is held)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_size(target: Path, expected: int) -> None:
    size = target.stat().st_size
    if size != expected:
        raise ArtifactError(f"{target}: {size} bytes, the manifest says {expected}: the file is truncated or was replaced")


def load_weights(files: Sequence[WeightFile], copy: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of `files` (later files' names win), each file checked against its size and sha256
    (a streaming digest: no copy of it is held), memory-mapped, and each tensor copied out of the
    mapping once (`copy`; False: the tensors are the mapping's pages)."""
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for file in files:
        target = Path(file.path)
        if not target.is_file():
            raise ArtifactError(f"{target}: missing, or not readable on this node ({platform.node()}); a rank opens "
                                "its own weight files, so the model folder must be at the same path on every node "
                                "that runs its ranks (shared storage, or a copy per node)")
        _check_size(target, file.bytes)
        if _file_sha256(target) != file.sha256:
            raise ArtifactError(f"{target}: checksum mismatch: the file was modified or corrupted since it was saved")
        try:
            mapped = load_file(str(target))
            weights.update({k: v.clone() for k, v in mapped.items()} if copy else mapped)
        except Exception as exc:
            raise ArtifactError(f"{target}: not a readable safetensors file ({exc})") from exc
    return weights


def split_replicated(weights: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Weights equal on every rank (stored once) and each rank's own."""
    shared = {
        name: tensor for name, tensor in weights[0].items()
        if all(name in w and w[name].shape == tensor.shape and w[name].dtype == tensor.dtype
               and torch.equal(w[name], tensor) for w in weights[1:])
    }
    own = [{k: v for k, v in w.items() if k not in shared} for w in weights]
    return shared, own


def _put(folder: Path, relpath: str, data: bytes, files: dict[str, dict[str, Any]]) -> str:
    """Write `data` at folder/relpath under a new inode (a rank that maps the old file keeps its
    bytes) and list it in `files`."""
    target = folder / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".tmp")
    partial.write_bytes(data)
    partial.replace(target)
    files[relpath] = {"sha256": _sha256(data), "bytes": len(data)}
    return relpath


def graph_name(bucket: int, digest: str) -> str:
    return f"graphs/bucket_{bucket:02d}_{digest[:12]}.graph"


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (equal tensors, equal digests; no copy when contiguous)."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(memoryview(data))
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardPlan:
    """Who writes what when every rank saves its own files (`plan_shards`): the graph files each rank
    names (by bucket) and the ones it writes (the lowest rank holding a graph writes it), and the
    weights every rank holds identically (written once, by rank 0, as weights/shared.safetensors)."""

    graphs: list[list[str]]
    writes: list[dict[int, str]]
    shared: list[str]


def plan_shards(digests: Sequence[dict[str, Any]]) -> ShardPlan:
    """The plan from each rank's `{"graphs": [sha256 per bucket], "weights": {name: tensor_digest} or None}`;
    the same files, names and split as `write` makes from the tensors."""
    names: dict[str, str] = {}
    graphs: list[list[str]] = []
    writes: list[dict[int, str]] = []
    for rank in digests:
        own, writing = [], {}
        for bucket, digest in enumerate(rank["graphs"]):
            if digest not in names:
                names[digest] = writing[bucket] = graph_name(bucket, digest)
            own.append(names[digest])
        graphs.append(own)
        writes.append(writing)
    weights = [rank["weights"] for rank in digests]
    shared = [] if weights[0] is None else [
        name for name, digest in weights[0].items() if all(w is not None and w.get(name) == digest for w in weights[1:])]
    return ShardPlan(graphs, writes, shared)


def write_graph_file(folder: Path, relpath: str, blob: bytes) -> dict[str, dict[str, Any]]:
    """Write one graph file under a new inode; its manifest entry `{relpath: {sha256, bytes}}`."""
    files: dict[str, dict[str, Any]] = {}
    _put(folder, relpath, blob, files)
    return files


def write_weight_file(folder: Path, relpath: str, weights: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Save `weights` as folder/relpath (safetensors, straight from the tensors' memory: a tensor is
    copied only when not contiguous or when it shares storage with another) under a new inode;
    returns the file's manifest entry `{relpath: {sha256, bytes}}`."""
    from safetensors.torch import save_file

    storages: dict[int, int] = {}
    for tensor in weights.values():
        key = tensor.untyped_storage().data_ptr()
        storages[key] = storages.get(key, 0) + 1
    storable = {name: (t.detach().contiguous().clone() if storages[t.untyped_storage().data_ptr()] > 1
                       else t.detach().contiguous()) for name, t in weights.items()}
    target = folder / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".tmp")
    save_file(storable, str(partial))
    entry = {"sha256": _file_sha256(partial), "bytes": partial.stat().st_size}
    partial.replace(target)
    return {relpath: entry}


def write(path: str | os.PathLike, exported: Exported) -> Path:
    """Save `exported` (every rank's graphs and weights, in this process) into the folder `path`."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = exported.state
    files: dict[str, dict[str, Any]] = {}

    def put(relpath: str, data: bytes) -> str:
        return _put(folder, relpath, data, files)

    graph_names: dict[str, str] = {}  # sha -> relpath: identical graphs stored once
    ranks = []
    for rank, rank_export in enumerate(exported.ranks):
        names = []
        for bucket, blob in enumerate(rank_export.graphs):
            digest = _sha256(blob)
            if digest not in graph_names:
                graph_names[digest] = put(graph_name(bucket, digest), blob)
            names.append(graph_names[digest])
        ranks.append({"graphs": names, "weights": None})

    shared_file = None
    if not state.inline_weights:
        shared, own = split_replicated([r.weights for r in exported.ranks])
        if shared:
            shared_file = "weights/shared.safetensors"
            files.update(write_weight_file(folder, shared_file, shared))
        for rank, weights in enumerate(own):
            ranks[rank]["weights"] = f"weights/rank_{rank:02d}.safetensors"
            files.update(write_weight_file(folder, ranks[rank]["weights"], weights))
    write_manifest(folder, state, ranks, shared_file, files)
    return folder


def write_manifest(folder: Path, state: ModelState, ranks: list[dict[str, Any]], shared_file: str | None,
                   files: dict[str, dict[str, Any]]) -> None:
    """The bucket kernel and the manifest (last: a folder without one is not a saved model), for
    files already written: `ranks` names each rank's graphs and weight file, `files` lists them all."""
    files = dict(files)
    kernel_file = _put(folder, "bucket_kernel.pt", state.kernel, files) if state.kernel else None
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tp_degree": state.tp_degree,
        "backend": state.backend,
        "inline_weights": state.inline_weights,
        "buckets": [[spec.to_json() for spec in sig] for sig in state.buckets],
        "trace_mode": state.trace_mode,
        "bucket_kernel": kernel_file,
        "partition_dims": state.partition_dims,
        "state_keys": state.state_keys,
        "io_aliases": state.io_aliases,
        "extra": state.extra,
        "ranks": ranks,
        "shared_weights": shared_file,
        "files": files,
        "versions": _versions(),
    }
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(folder / MANIFEST)  # the manifest lands last: a half-written folder has none


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such model folder (save one with parallel_model_save)")
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path}: missing; {folder} is not a saved tpcluster model or its save did not finish")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({exc}); the file is truncated or corrupted") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path}: not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path}: format version {version}, this tpcluster reads version {FORMAT_VERSION}; "
            "load it with the tpcluster that saved it, or retrace"
        )
    saved_torch = manifest.get("versions", {}).get("torch", "")
    if manifest.get("backend") == "cpu" and saved_torch.split(".")[:2] != torch.__version__.split(".")[:2]:
        raise ArtifactError(
            f"{manifest_path}: graphs were exported with torch {saved_torch}, this is torch {torch.__version__}; "
            "exported graphs are not portable across torch releases: retrace the model"
        )
    return manifest


def _listed(folder: Path, manifest: dict[str, Any], relpath: str) -> WeightFile:
    """The file `relpath` of a saved folder as its manifest lists it, present and of its listed size."""
    entry = manifest["files"].get(relpath)
    target = folder / relpath
    if entry is None:
        raise ArtifactError(f"{target}: referenced but not listed in {MANIFEST}; the manifest was edited")
    if not target.is_file():
        raise ArtifactError(f"{target}: missing from the model folder")
    _check_size(target, int(entry["bytes"]))
    return WeightFile(str(target.resolve()), entry["sha256"], int(entry["bytes"]))


def _read_checked(folder: Path, manifest: dict[str, Any], relpath: str) -> bytes:
    listed = _listed(folder, manifest, relpath)
    target = folder / relpath
    data = target.read_bytes()
    if _sha256(data) != listed.sha256:
        raise ArtifactError(f"{target}: checksum mismatch: the file was modified or corrupted since it was saved")
    return data


def read(path: str | os.PathLike, *, mapped: bool = False
         ) -> tuple[ModelState, list[list[bytes]], list[dict[str, torch.Tensor] | tuple[WeightFile, ...] | None]]:
    """The model state, each rank's graph files and each rank's weights, every file verified. With
    `mapped`, each rank's weights are its files (`WeightFile`s, checked for presence and size here,
    opened and fully checked by `load_weights` where they are used) rather than tensors."""
    from safetensors.torch import load

    folder = Path(path)
    manifest = read_manifest(folder)
    try:
        state = ModelState(
            tp_degree=int(manifest["tp_degree"]),
            backend=str(manifest["backend"]),
            inline_weights=bool(manifest["inline_weights"]),
            buckets=[tuple(TensorSpec.from_json(s) for s in sig) for sig in manifest["buckets"]],
            partition_dims=dict(manifest["partition_dims"]),
            state_keys=list(manifest["state_keys"]),
            trace_mode=list(manifest.get("trace_mode", [])),
            io_aliases={str(k): int(v) for k, v in manifest.get("io_aliases", {}).items()},
            extra=dict(manifest.get("extra", {})),
        )
        rank_entries = manifest["ranks"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{folder / MANIFEST}: malformed manifest ({exc!r})") from exc
    if len(rank_entries) != state.tp_degree:
        raise ArtifactError(f"{folder / MANIFEST}: lists {len(rank_entries)} ranks for tp_degree {state.tp_degree}")
    if manifest.get("bucket_kernel"):
        state.kernel = _read_checked(folder, manifest, manifest["bucket_kernel"])

    cache: dict[str, bytes] = {}

    def blob(relpath: str) -> bytes:
        if relpath not in cache:
            cache[relpath] = _read_checked(folder, manifest, relpath)
        return cache[relpath]

    def tensors(relpath: str) -> dict[str, torch.Tensor]:
        try:
            return load(blob(relpath))
        except ArtifactError:
            raise
        except Exception as exc:
            raise ArtifactError(f"{folder / relpath}: not a readable safetensors file ({exc})") from exc

    if mapped:
        shared_files = (_listed(folder, manifest, manifest["shared_weights"]),) if manifest.get("shared_weights") else ()
    shared = tensors(manifest["shared_weights"]) if manifest.get("shared_weights") and not mapped else {}
    graphs, weights = [], []
    for entry in rank_entries:
        if len(entry["graphs"]) != len(state.buckets):
            raise ArtifactError(f"{folder / MANIFEST}: a rank lists {len(entry['graphs'])} graphs for {len(state.buckets)} buckets")
        graphs.append([blob(name) for name in entry["graphs"]])
        if state.inline_weights:
            weights.append(None)
        elif mapped:
            weights.append(shared_files + ((_listed(folder, manifest, entry["weights"]),) if entry.get("weights") else ()))
        else:
            own = tensors(entry["weights"]) if entry.get("weights") else {}
            weights.append({**shared, **own})
    return state, graphs, weights


def digest(path: str | os.PathLike) -> str:
    """The model's identity: the sha256 of its manifest (which holds every file's sha256), and of its
    fused draft's manifest when it has one (cluster.trace.fused)."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise ArtifactError(f"{path} is not a saved model (no {MANIFEST}); save one with parallel_model_save")
    data = manifest.read_bytes()
    draft = Path(path) / "draft" / MANIFEST
    return _sha256(data + draft.read_bytes()) if draft.is_file() else _sha256(data)


def tensor_bytes(path: str | os.PathLike) -> int:
    """Bytes of tensor data in a saved model (graph files' inlined weights included)."""
    from safetensors import safe_open

    total = 0
    for file in Path(path).rglob("*"):
        if file.suffix in (".safetensors", ".graph") and file.is_file():
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():
                    t = handle.get_slice(key)
                    n = 1
                    for d in t.get_shape():
                        n *= d
                    total += n * _dtype_size(t.get_dtype())
    return total


def _dtype_size(name: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(name, 4)
