"""Benchmark sections on in-process traced models: core, separation, buckets, trace_once, decoder.

torch and the cluster are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from actors.bench.inputs import minilm_inputs
from actors.bench.measure import latency_ms, timed


def bench_core(results: dict[str, Any], repeats: int) -> None:
    import torch

    from cluster.models.bert import minilm_embedder
    from cluster.trace import parallel_model_trace

    inputs = minilm_inputs(128)
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
        minilm_embedder, [minilm_inputs(b, 1) for b in buckets], tp_degree=tp, inline_weights_to_neff=False,
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
            with parallel_model_trace(minilm_embedder, minilm_inputs(b, 1), tp_degree=2, progress=False) as model:
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
    short = tuple(t[:1, :16] for t in minilm_inputs(16, 1))
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


def bench_decoder(results: dict[str, Any], repeats: int) -> None:
    """Tokens/s on the shipped pair: ours target-only and speculative, with the draft as a separate
    model (k = 2, 4, 6) and fused into the target (k = 2, 4, 6, and adaptive: speculation_length 0),
    and with n-gram lookup instead of a draft (k = 4, adaptive); transformers' generate, assisted
    generation and prompt lookup (`prompt_lookup_num_tokens=4`) in-process; greedy, batch 1, 64 new tokens."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cluster.generation import NGRAM_DRAFT, generate
    from cluster.models.defaults import ensure_decoders
    from cluster.models.pair import draft_path, pair_path, target_path
    from cluster.trace import parallel_model_load

    new = 64
    tokenizer = AutoTokenizer.from_pretrained(pair_path())
    prompts = ["The for statement is used to", "A class definition defines", "Return a new list containing"]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    folders = ensure_decoders()
    out: dict[str, Any] = {"setup": f"shipped pair, greedy, batch 1, {new} new tokens, {len(prompts)} prompts; target TP=2, draft TP=1"}
    hf_target = LlamaForCausalLM.from_pretrained(target_path(), dtype=torch.float32).eval()
    hf_draft = LlamaForCausalLM.from_pretrained(draft_path(), dtype=torch.float32).eval()

    def hf_run(**kwargs: Any) -> float:
        start = time.perf_counter()
        for p in ids:
            hf_target.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, **kwargs)
        return len(ids) * new / (time.perf_counter() - start)

    hf_run()  # warm-up
    out["hf_generate_tok_s"] = hf_run()
    out["hf_assisted_tok_s"] = hf_run(assistant_model=hf_draft)
    out["hf_prompt_lookup_tok_s"] = hf_run(prompt_lookup_num_tokens=4)
    with parallel_model_load(folders["pair-target"]) as target, parallel_model_load(folders["pair-draft"]) as draft:
        def ours(**kwargs: Any) -> tuple[float, dict]:
            start, stats, sequences = time.perf_counter(), None, []
            for p in ids:
                result = generate(target, [p], max_new_tokens=new, **kwargs)
                stats = result.stats
                sequences.append(result.sequences[0])
            return len(ids) * new / (time.perf_counter() - start), {"acceptance_rate": stats.acceptance_rate,
                                                                     "mean_accepted_length": stats.mean_accepted_length}

        ours()
        out["target_only_tok_s"], _ = ours()
        runs = [(f"speculative_k{k}", dict(draft_model=draft, speculation_length=k)) for k in (2, 4, 6)]
        runs += [(f"fused_k{k}", dict(draft_model="pair-draft", speculation_length=k)) for k in (2, 4, 6)]
        runs += [("fused_adaptive", dict(draft_model="pair-draft")), ("speculative_adaptive", dict(draft_model=draft))]
        runs += [("ngram_k4", dict(draft_model=NGRAM_DRAFT, speculation_length=4)), ("ngram_adaptive", dict(draft_model=NGRAM_DRAFT))]
        for label, kwargs in runs:
            rate, stats = ours(**kwargs)
            out[f"{label}_tok_s"] = rate
            out[label] = stats
            out[f"{label}_over_target_only"] = rate / out["target_only_tok_s"]
            out[f"{label}_over_hf_assisted"] = rate / out["hf_assisted_tok_s"]
            if label.startswith("ngram"):
                out[f"{label}_over_hf_prompt_lookup"] = rate / out["hf_prompt_lookup_tok_s"]
        out["target_only_over_hf_generate"] = out["target_only_tok_s"] / out["hf_generate_tok_s"]
        out["sample_text"] = tokenizer.decode(generate(target, [ids[0]], max_new_tokens=40).sequences[0])
    results["decoder"] = out
