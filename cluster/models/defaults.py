"""The embedded default models, traced once and cached as saved artifacts.

`ensure_defaults()` returns {name: folder}; a folder missing or saved by another version is
retraced (on the running cluster) and saved with its serving.json and tokenizer.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from cluster.errors import ArtifactError
from cluster.serving import ServingSpec

DEFAULTS_VERSION = 8  # 8: the target's extend graphs (chunked prefill); 7: the distilled 3-layer pair draft; 6: collectives traced as tpcluster::all_gather
BATCH_BUCKETS = (1, 4, 16)
SEQ_BUCKETS = (32, 128)


def cache_root() -> Path:
    """TPCLUSTER_CACHE, else ~/.cache/tpcluster: where traced models are kept between runs."""
    return Path(os.environ.get("TPCLUSTER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tpcluster"))


def cache_dir() -> Path:
    return cache_root() / "defaults" / f"torch-{torch.__version__}"


def _examples(num_inputs: int, batch_buckets, seq_buckets) -> list[tuple[torch.Tensor, ...]]:
    examples = []
    for b in batch_buckets:
        for s in seq_buckets:
            ids = torch.full((b, s), 101, dtype=torch.long)
            # distinct tensors per input: torch.export merges inputs that are the same tensor
            examples.append(tuple(t for _ in range(num_inputs // 3) for t in (ids.clone(), torch.ones_like(ids), torch.zeros_like(ids))))
    return examples


def _build(folder: Path, func: Callable, num_inputs: int, spec: ServingSpec, tp_degree: int) -> None:
    batch_buckets, seq_buckets = spec.batch_buckets, spec.seq_buckets
    import cluster
    from cluster.models.bert import minilm_path

    config = cluster.trace.BucketModelConfig(
        lambda: cluster.buckets.batch_sequence_bucket_kernel(batch_buckets, seq_buckets, num_inputs)
    )
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with cluster.trace.parallel_model_trace(func, _examples(num_inputs, batch_buckets, seq_buckets), tp_degree=tp_degree, inline_weights_to_neff=False,
                                            bucket_config=config, progress=None) as model:
        cluster.trace.parallel_model_save(model, tmp)
    tokenizer_dir = tmp / "tokenizer"
    tokenizer_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (minilm_path() / name).is_file():
            shutil.copy(minilm_path() / name, tokenizer_dir / name)
    spec.write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


DECODER_LAYOUT = dict(batch_buckets=(1, 4, 16), prompt_buckets=(32, 128), cache_buckets=(256, 512), verify_tokens=7,
                      chunk_tokens=128)
DRAFT_LAYOUT = dict(batch_buckets=(1, 4, 16), prompt_buckets=(32, 128), cache_buckets=(256, 512))


def build_decoder(source: Path, folder: Path, tp_degree: int, layout: dict, tokenizer: Path, name: str) -> None:
    """Trace a transformers Llama folder for generation and save it with its tokenizer and serving.json."""
    from cluster.generation.layout import DecoderLayout
    from cluster.models.llama import trace_llama
    from cluster.trace import parallel_model_save

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with trace_llama(source, tp_degree=tp_degree, layout=DecoderLayout(**layout), name=name) as model:
        parallel_model_save(model, tmp)
    (tmp / "tokenizer").mkdir()
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer / file).is_file():
            shutil.copy(tokenizer / file, tmp / "tokenizer" / file)
    ServingSpec(task="generate", tokenizer="tokenizer", max_length=DecoderLayout(**layout).max_prompt,
                extra={"defaults_version": DEFAULTS_VERSION}).write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def ensure_decoders(root: Path | None = None, target_tp: int = 2) -> dict[str, Path]:
    """The shipped target/draft pair, traced for generation, the draft also fused into the target
    (empty if the pair is not in this checkout)."""
    from cluster.models.pair import draft_path, pair_path, target_path
    from cluster.trace.artifact import read_manifest
    from cluster.trace.fused import DRAFT_FOLDER, fuse_draft

    if not (target_path() / "config.json").is_file():
        return {}
    folders = {}
    for name, source, tp, layout in (("pair-target", target_path(), target_tp, DECODER_LAYOUT),
                                     ("pair-draft", draft_path(), 1, DRAFT_LAYOUT)):
        folder = (root or cache_dir()) / f"{name}-tp{tp}"
        try:
            read_manifest(folder)
            ok = ServingSpec.read(folder).extra.get("defaults_version") == DEFAULTS_VERSION
        except ArtifactError:
            ok = False
        if not ok:
            build_decoder(source, folder, tp, layout, pair_path(), name)
        folders[name] = folder
    # the target also holds the draft whole on each of its ranks: Generate with draft_model="pair-draft"
    # speculates in one call to the target's ranks (cluster.trace.fused)
    fused = folders["pair-target"] / DRAFT_FOLDER / "manifest.json"
    if not fused.is_file() or fused.read_bytes() != (folders["pair-draft"] / "manifest.json").read_bytes():
        fuse_draft(folders["pair-target"], folders["pair-draft"])
    return folders


def ensure_defaults(tp_degree: int = 2, batch_buckets: tuple[int, ...] = BATCH_BUCKETS,
                    seq_buckets: tuple[int, ...] = SEQ_BUCKETS, root: Path | None = None) -> dict[str, Path]:
    from cluster.models.bert import minilm_embedder, minilm_paraphrase
    from cluster.trace.artifact import read_manifest

    # bump DEFAULTS_VERSION when the default models change: cached copies are then retraced
    common = dict(extra={"defaults_version": DEFAULTS_VERSION}, tokenizer="tokenizer", max_length=max(seq_buckets),
                  batch_buckets=tuple(batch_buckets), seq_buckets=tuple(seq_buckets))
    wanted = {
        "minilm-embed": (minilm_embedder, 3, ServingSpec(task="embed", **common)),
        "minilm-paraphrase": (minilm_paraphrase, 6, ServingSpec(task="classify", labels=("different", "paraphrase"),
                                                                pair_encoding="separate", **common)),
    }
    folders = {}
    for name, (func, num_inputs, spec) in wanted.items():
        folder = (root or cache_dir()) / f"{name}-tp{tp_degree}"
        try:
            read_manifest(folder)
            ok = ServingSpec.read(folder) == spec
        except ArtifactError:
            ok = False
        if not ok:
            _build(folder, func, num_inputs, spec, tp_degree)
        folders[name] = folder
    return folders


def ensure_all_defaults() -> dict[str, Path]:
    """Every embedded default: the MiniLM embedder and paraphrase classifier, and the decoder pair."""
    return {**ensure_defaults(), **ensure_decoders()}
