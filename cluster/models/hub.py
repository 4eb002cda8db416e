"""Compile a Hugging Face checkpoint folder into a saved model folder that `tpcluster serve` loads.

    compile(src, out, tp_degree=2)         trace and save: out/ is what parallel_model_save writes,
                                           plus tokenizer/ and serving.json; returns a CompileSummary
    ensure_compiled(src, tp_degree=2)      the same into the cache, keyed by the checkpoint's file
                                           hashes and the options: the second call returns at once

Everything is checked before a rank starts (cluster.models.architectures). The folder is written
as OUT.partial and renamed at the end, so an interrupted compile leaves nothing `serve` would load.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cluster.errors import ArtifactError, CheckpointError
from cluster.models.architectures import TOKENIZER_FILES, CheckpointInfo, check_checkpoint, inspect_checkpoint
from cluster.serving import ServingSpec

COMPILE_VERSION = 1  # bump when compiled folders change: cached ones are then recompiled
DTYPES = ("float32", "bfloat16", "float16")
DECODER_DEFAULTS = dict(batch_buckets=(1, 4, 16), prompt_buckets=(32, 128), cache_buckets=(256, 512))
ENCODER_DEFAULTS = dict(batch_buckets=(1, 4, 16), seq_buckets=(32, 128))
SOURCE_FILE = "compiled_from.json"


def _buckets(name: str, values: tuple[int, ...]) -> None:
    if values and (list(values) != sorted(set(values)) or values[0] < 1):
        raise ValueError(f"{name} must be increasing positive sizes, got {values}")


@dataclass(frozen=True)
class CompileOptions:
    """How to compile a checkpoint; empty buckets take the defaults (capped by the model's positions)."""

    task: str | None = None  # None: inferred from the architecture
    dtype: str = "float32"
    batch_buckets: tuple[int, ...] = ()
    prompt_buckets: tuple[int, ...] = ()  # decoders
    cache_buckets: tuple[int, ...] = ()  # decoders
    seq_buckets: tuple[int, ...] = ()  # encoders
    max_sequences: int = 0  # decoders: sequences decoded together (the largest batch bucket); 0: default
    verify_tokens: int = 5  # decoders: k + 1 of speculative decoding as a target; 0: no verify graphs
    # decoders: a prompt longer than this is prefilled this many tokens a round (extend graphs), up to
    # what the cache holds; None: the largest prompt bucket; 0: none (prompts must fit a prompt bucket).
    # A T5 takes none: its encoder reads the whole prompt in one pass.
    chunk_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.task not in (None, "generate", "embed", "classify"):
            raise ValueError(f"task must be generate, embed or classify, got {self.task!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("batch_buckets", "prompt_buckets", "cache_buckets", "seq_buckets"):
            _buckets(name, getattr(self, name))
        if self.max_sequences < 0 or self.verify_tokens < 0 or (self.chunk_tokens or 0) < 0:
            raise ValueError("max_sequences, verify_tokens and chunk_tokens must be at least 0")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _capped(values: tuple[int, ...], limit: int) -> tuple[int, ...]:
    if not limit:
        return values
    kept = tuple(v for v in values if v <= limit)
    return kept if kept and kept[-1] == limit or len(kept) == len(values) else kept + (limit,)


def decoder_layout(info: CheckpointInfo, options: CompileOptions) -> Any:
    """The DecoderLayout of a compile: the options' buckets, else the defaults within max positions."""
    from cluster.generation.layout import DecoderLayout

    positions = int(info.config.get("max_position_embeddings") or 0)
    cache = options.cache_buckets or _capped(DECODER_DEFAULTS["cache_buckets"], positions)
    prompt = options.prompt_buckets or tuple(p for p in DECODER_DEFAULTS["prompt_buckets"] if p <= cache[-1]) or (cache[-1],)
    batch = options.batch_buckets or DECODER_DEFAULTS["batch_buckets"]
    if options.max_sequences:
        batch = tuple(b for b in batch if b < options.max_sequences) + (options.max_sequences,)
    # a T5 has no verify graphs (it is served target-only) and no extend graphs (its encoder reads the whole prompt)
    chunk = max(prompt) if options.chunk_tokens is None else options.chunk_tokens
    if chunk >= cache[-1]:
        chunk = 0  # the largest prompt bucket fills the cache: nothing is longer
    return DecoderLayout(tuple(batch), tuple(prompt), tuple(cache), 0 if info.is_seq2seq else options.verify_tokens,
                         0 if info.is_seq2seq else chunk)


@dataclass(frozen=True)
class DecoderMemory:
    """What a compiled decoder replica holds in host memory: its weights (in the compile's dtype) and
    each rank's KV cache, which has a slot per sequence decoded together (the largest batch bucket)
    at the largest cache length."""

    weights_bytes: int
    cache_bytes_per_sequence: int
    sequences: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.cache_bytes_per_sequence * self.sequences

    def describe(self) -> str:
        return (f"host memory: weights {self.weights_bytes / 2**30:.2f} GiB + KV cache "
                f"{self.cache_bytes_per_sequence / 2**20:.1f} MiB a sequence x {self.sequences} sequences "
                f"= {self.total_bytes / 2**30:.2f} GiB for the replica (all ranks)")


def decoder_memory(info: CheckpointInfo, layout: Any, dtype: str, parameters: int) -> DecoderMemory:
    """The memory a Llama-family decoder compiled with `layout` holds (T5 keeps other state: not sized here)."""
    config = info.config
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    width = 4 if dtype == "float32" else 2
    per_sequence = 2 * int(config["num_hidden_layers"]) * kv_heads * head_dim * max(layout.cache_buckets) * width
    return DecoderMemory(parameters * width, per_sequence, max(layout.batch_buckets))


def check_memory(memory: DecoderMemory, host_bytes: int, share: float = 0.9) -> None:
    """CheckpointError when the replica would not fit `share` of the host's memory, saying what fits."""
    budget = int(host_bytes * share)
    if memory.total_bytes <= budget:
        return
    fits = (budget - memory.weights_bytes) // memory.cache_bytes_per_sequence if memory.cache_bytes_per_sequence else 0
    advice = (f"at most {fits} sequences fit (--max-sequences {fits}), or use shorter --cache-buckets" if fits >= 1
              else "the weights alone do not fit: use a larger machine or a smaller --dtype")
    raise CheckpointError(f"{memory.describe()}, more than {share:.0%} of this machine's {host_bytes / 2**30:.1f} GiB; "
                          f"{advice}")


def host_memory_bytes() -> int:
    """This machine's physical memory (where a local cluster's ranks run)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def encoder_buckets(info: CheckpointInfo, options: CompileOptions) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(batch buckets, sequence buckets) of an encoder compile."""
    seq = options.seq_buckets or _capped(ENCODER_DEFAULTS["seq_buckets"], info.max_positions)
    if info.max_positions and seq[-1] > info.max_positions:
        raise CheckpointError(f"{info.architecture}: sequence bucket {seq[-1]} is above the model's "
                              f"{info.max_positions} positions")
    return tuple(options.batch_buckets or ENCODER_DEFAULTS["batch_buckets"]), tuple(seq)


def _encoder_examples(batch_buckets, seq_buckets) -> list[tuple[torch.Tensor, ...]]:
    # distinct tensors per input: torch.export merges inputs that are the same tensor
    return [(torch.full((b, s), 2, dtype=torch.long), torch.ones(b, s, dtype=torch.long), torch.zeros(b, s, dtype=torch.long))
            for b in batch_buckets for s in seq_buckets]


def trace_checkpoint(src: str | os.PathLike, tp_degree: int = 2, options: CompileOptions = CompileOptions(),
                     progress: bool | None = None, backend: str = "auto",
                     info: CheckpointInfo | None = None) -> tuple[Any, ServingSpec]:
    """(ParallelModel, its ServingSpec): the checkpoint traced for its task on `tp_degree` ranks.
    Checks everything first (architectures.check_checkpoint)."""
    src = Path(src).resolve()
    info = info or inspect_checkpoint(src, options.task)
    dtype = None if options.dtype == "float32" else options.dtype
    extra = {"architecture": info.architecture, "compile_version": COMPILE_VERSION}
    if info.is_decoder or info.is_seq2seq:
        from cluster.models.llama import trace_llama
        from cluster.models.t5 import trace_t5

        layout = decoder_layout(info, options)
        extra["parameters"] = check_checkpoint(info, tp_degree, layout.max_cache)
        if info.is_decoder:  # before any rank starts: a replica that cannot fit is refused here
            memory = decoder_memory(info, layout, options.dtype, extra["parameters"])
            _say(progress, memory.describe())
            check_memory(memory, host_memory_bytes())
            extra["kv_cache_bytes_per_sequence"] = memory.cache_bytes_per_sequence
        trace = trace_t5 if info.is_seq2seq else trace_llama
        model = trace(src, tp_degree=tp_degree, layout=layout, name=src.name, progress=progress, dtype=dtype, backend=backend)
        return model, ServingSpec(task="generate", tokenizer="tokenizer", max_length=layout.max_prompt, extra=extra)
    from cluster.buckets import batch_sequence_bucket_kernel
    from cluster.models.encoders import encoder_from_checkpoint
    from cluster.trace import BucketModelConfig, parallel_model_trace

    batch, seq = encoder_buckets(info, options)
    extra["parameters"] = check_checkpoint(info, tp_degree)
    func = functools.partial(encoder_from_checkpoint, str(src), info.architecture, info.task, dtype)
    model = parallel_model_trace(func, _encoder_examples(batch, seq), tp_degree=tp_degree, inline_weights_to_neff=False,
                                 bucket_config=BucketModelConfig(lambda: batch_sequence_bucket_kernel(batch, seq, 3)),
                                 progress=progress, backend=backend, metadata={"source": extra})
    return model, ServingSpec(task=info.task, tokenizer="tokenizer", labels=info.labels, max_length=seq[-1],
                              batch_buckets=batch, seq_buckets=seq, extra=extra)


@dataclass(frozen=True)
class CompileSummary:
    folder: Path
    source: Path
    architecture: str
    task: str
    tp_degree: int
    dtype: str
    parameters: int
    graphs: int
    buckets: dict = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    seconds: float = 0.0
    bytes_on_disk: int = 0

    def describe(self) -> str:
        """A few lines for a terminal: what was built and how to serve it."""
        lines = [f"compiled {self.source} -> {self.folder}",
                 f"  {self.architecture}, task {self.task}, tp {self.tp_degree}, {self.dtype}, "
                 f"{self.parameters / 1e6:.2f}M parameters",
                 f"  {self.graphs} graphs: " + ", ".join(f"{k} {list(v) if isinstance(v, (list, tuple)) else v}"
                                                        for k, v in self.buckets.items())]
        if self.labels:
            lines.append(f"  labels: {', '.join(self.labels)}")
        lines.append(f"  {self.bytes_on_disk / 2**20:.1f} MiB on disk, {self.seconds:.1f} s")
        lines.append(f"  serve it: tpcluster serve --model NAME={self.folder}")
        return "\n".join(lines)


def _say(progress: bool | None, message: str) -> None:
    if progress or (progress is None and sys.stderr.isatty()):
        print(f"[tpcluster] {message}", file=sys.stderr, flush=True)


def _copy_tokenizer(src: Path, folder: Path) -> None:
    (folder / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, folder / "tokenizer" / name)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def compile(src: str | os.PathLike, out: str | os.PathLike, tp_degree: int = 2,
            options: CompileOptions = CompileOptions(), progress: bool | None = None, force: bool = False,
            backend: str = "auto") -> CompileSummary:
    """Compile the checkpoint folder `src` into the saved model folder `out` (see the module docstring).

    An existing `out` is refused unless `force`; on any failure (or interrupt) nothing is left at
    `out` nor at `out.partial`."""
    from cluster.trace import parallel_model_save

    src, out = Path(src).resolve(), Path(out)
    if out.exists() and not force:
        raise ArtifactError(f"{out} already exists; pass force=True (--force) to replace it, or pick another folder")
    started = time.perf_counter()
    info = inspect_checkpoint(src, options.task)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _say(progress, f"{info.architecture} ({info.task}): checking config, tokenizer and weights")
        model, spec = trace_checkpoint(src, tp_degree, options, progress, backend, info)
        with model:
            graphs = len(model.buckets)
            _say(progress, f"saving {graphs} graphs to {out}")
            parallel_model_save(model, partial)
        _copy_tokenizer(src, partial)
        spec.write(partial)
        (partial / SOURCE_FILE).write_text(json.dumps({"source": str(src), "architecture": info.architecture,
                                                       "tp_degree": tp_degree, "options": options.to_json()}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    buckets = (decoder_layout(info, options).to_json() if info.is_decoder or info.is_seq2seq else {"batch_buckets": spec.batch_buckets, "seq_buckets": spec.seq_buckets})
    return CompileSummary(folder=out, source=src, architecture=info.architecture, task=info.task, tp_degree=tp_degree,
                          dtype=options.dtype, parameters=spec.extra["parameters"], graphs=graphs, buckets=buckets,
                          labels=spec.labels,
                          seconds=time.perf_counter() - started, bytes_on_disk=_size(out))


def is_checkpoint(folder: str | os.PathLike) -> bool:
    """True for a Hugging Face checkpoint folder (config.json, no manifest), False for a saved model."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and not (folder / "manifest.json").is_file()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_digest(src: str | os.PathLike, tp_degree: int, options: CompileOptions) -> str:
    """sha256 over every file of the checkpoint (name and content hash), the TP degree, the options,
    torch's version and COMPILE_VERSION: a compiled folder's cache key."""
    src = Path(src)
    files = sorted(p for p in src.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts))
    key = {"files": [[p.relative_to(src).as_posix(), _file_digest(p)] for p in files], "tp_degree": tp_degree,
           "options": options.to_json(), "torch": torch.__version__, "compile_version": COMPILE_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def compiled_cache_dir() -> Path:
    from cluster.models.defaults import cache_root

    return cache_root() / "compiled" / f"torch-{torch.__version__}"


def ensure_compiled(src: str | os.PathLike, tp_degree: int = 2, options: CompileOptions = CompileOptions(),
                    root: str | os.PathLike | None = None, progress: bool | None = None,
                    backend: str = "auto") -> Path:
    """The saved model folder compiled from `src` with these options: from the cache when there, else
    compiled into it (root: default `compiled_cache_dir()`, under TPCLUSTER_CACHE)."""
    from cluster.trace.artifact import read_manifest

    src = Path(src).resolve()
    inspect_checkpoint(src, options.task)  # an unsupported folder fails before hashing its weights
    folder = Path(root or compiled_cache_dir()) / f"{src.name}-tp{tp_degree}-{checkpoint_digest(src, tp_degree, options)[:16]}"
    try:
        read_manifest(folder)
        if (folder / "serving.json").is_file():
            return folder
    except ArtifactError:
        pass
    folder.parent.mkdir(parents=True, exist_ok=True)
    compile(src, folder, tp_degree, options, progress, force=True, backend=backend)
    return folder
