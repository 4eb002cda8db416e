"""`tpcluster bench`: every figure is a ratio to an in-process baseline measured in the same run.

Sections (pick with --only): core (eager vs ParallelModel TP=1/2, trace time), separation
(artifact bytes and load time, separated vs inlined), buckets (16-token latency with buckets
[128, 512] vs one 512 bucket), trace_once (trace time at TP 1/2/4, once vs per rank).
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

SENTENCES = [
    "The company HuggingFace is based in New York City",
    "Apples are especially bad for your health",
    "HuggingFace's headquarters are situated in Manhattan",
]


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}, torch {torch.__version__}, no accelerator"


def latency_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return {"p50_ms": statistics.median(samples), "p90_ms": samples[int(0.9 * (len(samples) - 1))]}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _inputs(length: int, batch: int = 3) -> tuple[torch.Tensor, ...]:
    from transformers import AutoTokenizer

    from cluster.models.bert import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    enc = tokenizer((SENTENCES * batch)[:batch], max_length=length, padding="max_length", truncation=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


def bench_core(results: dict[str, Any], repeats: int) -> None:
    from cluster.models.bert import minilm_embedder
    from cluster.trace import parallel_model_trace

    inputs = _inputs(128)
    eager = minilm_embedder(tensor_parallel=False)[0]
    with torch.no_grad():
        base = latency_ms(lambda: eager(*inputs), repeats)
    section = {"input": "MiniLM embedder, batch 3 x 128 tokens", "eager_in_process": base}
    for tp in (1, 2):
        model, seconds = timed(lambda: parallel_model_trace(minilm_embedder, inputs, tp_degree=tp, progress=False))
        with model:
            lat = latency_ms(lambda: model(*inputs), repeats)
        section[f"tp{tp}"] = {**lat, "ratio_to_eager": lat["p50_ms"] / base["p50_ms"], "trace_s": model.trace_seconds,
                              "total_s": seconds}
    results["core"] = section


def _bucketed(buckets: list[int], tp: int = 2, spmd_mode: bool | None = None):
    import cluster
    from cluster.models.bert import minilm_embedder

    config = cluster.trace.BucketModelConfig(lambda: cluster.sequence_bucket_kernel(buckets, num_inputs=3))
    return cluster.trace.parallel_model_trace(
        minilm_embedder, [_inputs(b, 1) for b in buckets], tp_degree=tp, inline_weights_to_neff=False,
        bucket_config=config, spmd_mode=spmd_mode, progress=False,
    )


def bench_separation(results: dict[str, Any], repeats: int) -> None:
    from cluster.models.bert import minilm_embedder
    from cluster.trace import parallel_model_load, parallel_model_save, parallel_model_trace
    from cluster.trace.artifact import tensor_bytes

    buckets = [128, 512]
    with tempfile.TemporaryDirectory() as tmp:
        with _bucketed(buckets) as model:
            parallel_model_save(model, Path(tmp) / "separated")
        inline_dirs = []
        for b in buckets:  # without separation, each bucket is its own model with its own weights
            with parallel_model_trace(minilm_embedder, _inputs(b, 1), tp_degree=2, progress=False) as model:
                parallel_model_save(model, Path(tmp) / f"inline_{b}")
            inline_dirs.append(Path(tmp) / f"inline_{b}")
        sep_bytes = sum(f.stat().st_size for f in (Path(tmp) / "separated").rglob("*") if f.is_file())
        inl_bytes = sum(f.stat().st_size for d in inline_dirs for f in d.rglob("*") if f.is_file())
        model, sep_load = timed(lambda: parallel_model_load(Path(tmp) / "separated"))
        model.close()
        inl_load = 0.0
        for d in inline_dirs:
            model, seconds = timed(lambda: parallel_model_load(d))
            model.close()
            inl_load += seconds
        results["separation"] = {
            "setup": "MiniLM embedder, TP=2, buckets [128, 512]; inlined = one inline model per bucket",
            "separated_bytes": sep_bytes, "inlined_bytes": inl_bytes, "bytes_ratio": sep_bytes / inl_bytes,
            "separated_tensor_bytes": tensor_bytes(Path(tmp) / "separated"),
            "separated_load_s": sep_load, "inlined_load_s": inl_load, "load_ratio": sep_load / inl_load,
        }


def bench_buckets(results: dict[str, Any], repeats: int) -> None:
    short = tuple(t[:1, :16] for t in _inputs(16, 1))
    out = {"input": "MiniLM embedder, TP=2, 1 x 16 tokens"}
    for name, buckets in (("buckets_128_512", [128, 512]), ("single_512", [512])):
        with _bucketed(buckets) as model:
            out[name] = latency_ms(lambda: model(*short), repeats)
    out["ratio"] = out["buckets_128_512"]["p50_ms"] / out["single_512"]["p50_ms"]
    results["buckets"] = out


def bench_trace_once(results: dict[str, Any], repeats: int) -> None:
    out: dict[str, Any] = {"setup": "MiniLM embedder, buckets [128, 512], separated weights; *_s: seconds tracing "
                                    "(export, graph hand-over, verification), *_total_s: call to ready (actors, model build)"}
    for tp in (1, 2, 4):
        for mode, spmd in (("once", None), ("per_rank", False)):
            model, seconds = timed(lambda: _bucketed([128, 512], tp=tp, spmd_mode=spmd))
            model.close()
            out[f"tp{tp}_{mode}_s"] = model.trace_seconds
            out[f"tp{tp}_{mode}_total_s"] = seconds
        out[f"tp{tp}_once_over_per_rank"] = out[f"tp{tp}_once_s"] / out[f"tp{tp}_per_rank_s"]
    results["trace_once"] = out


SECTIONS = {"core": bench_core, "separation": bench_separation, "buckets": bench_buckets, "trace_once": bench_trace_once}


def summary(results: dict[str, Any]) -> str:
    parts = []
    if "core" in results:
        c = results["core"]
        parts.append(f"eager {c['eager_in_process']['p50_ms']:.1f} ms, TP1 x{c['tp1']['ratio_to_eager']:.2f}, TP2 x{c['tp2']['ratio_to_eager']:.2f}")
    if "separation" in results:
        s = results["separation"]
        parts.append(f"separated/inlined bytes x{s['bytes_ratio']:.2f} load x{s['load_ratio']:.2f}")
    if "buckets" in results:
        parts.append(f"16 tokens, buckets[128,512]/single[512] x{results['buckets']['ratio']:.2f}")
    if "trace_once" in results:
        t = results["trace_once"]
        parts.append("trace once/per-rank " + ", ".join(f"TP{tp} x{t[f'tp{tp}_once_over_per_rank']:.2f}" for tp in (1, 2, 4)))
    return "; ".join(parts)


def chart(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars: list[tuple[str, float]] = []
    if "core" in results:
        bars += [("TP=1 latency", results["core"]["tp1"]["ratio_to_eager"]), ("TP=2 latency", results["core"]["tp2"]["ratio_to_eager"])]
    if "separation" in results:
        bars += [("separated bytes", results["separation"]["bytes_ratio"]), ("separated load", results["separation"]["load_ratio"])]
    if "buckets" in results:
        bars.append(("16 tok, 2 buckets", results["buckets"]["ratio"]))
    if "trace_once" in results:
        bars += [(f"trace once TP={tp}", results["trace_once"][f"tp{tp}_once_over_per_rank"]) for tp in (1, 2, 4)]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(bars) + 1))
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color="#4477aa")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("ratio to the in-process / baseline figure of the same run (lower is better)")
    ax.set_title(f"tpcluster bench ({results['machine']})", fontsize=8)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(only: list[str] | None, repeats: int, json_path: str | None, chart_path: str | None) -> dict[str, Any]:
    import cluster

    cluster.init()
    results: dict[str, Any] = {"machine": machine(), "repeats": repeats}
    for name in only or list(SECTIONS):
        SECTIONS[name](results, repeats)
    results["summary"] = summary(results)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1))
    if chart_path:
        chart(results, chart_path)
    return results
