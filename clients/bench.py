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
    return {"p50_ms": statistics.median(samples), "p90_ms": samples[int(0.9 * (len(samples) - 1))],
            "p99_ms": samples[int(0.99 * (len(samples) - 1))]}


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
    if "decoder" in results:
        d = results["decoder"]
        parts.append(f"decode target-only {d['target_only_tok_s']:.0f} tok/s; speculative/target-only "
                     + ", ".join(f"k{k} x{d[f'speculative_k{k}_over_target_only']:.2f}" for k in (2, 4, 6))
                     + f"; vs HF assisted x{max(d[f'speculative_k{k}_over_hf_assisted'] for k in (2, 4, 6)):.2f}")
    if "gateway" in results:
        g = results["gateway"]
        parts.append(f"gateway +{g['gateway_added_p50_ms']:.1f} ms p50; batching gain at 32 clients x{g['classify_32_clients_batching_gain']:.2f}")
    if "generate" in results:
        g = results["generate"]
        parts.append("Generate continuous batching gain at 1/8/32 clients "
                     + "/".join(f"x{g[f'generate_{c}_clients_batching_gain']:.2f}" for c in (1, 8, 32)))
    if "batch" in results:
        parts.append(f"batch job x{results['batch']['batch_job_over_loop']:.2f} records/s of an in-process loop")
    if "soak" in results:
        s = results["soak"]
        parts.append(f"soak {s['requests']} requests, {s['crashes']} crashes, {s['lost']} lost, p99 {s['good_p99_ms']:.0f} ms")
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
    if "decoder" in results:
        bars += [(f"speculative k={k}: time/token vs target-only", 1 / results["decoder"][f"speculative_k{k}_over_target_only"]) for k in (2, 4, 6)]
    if "gateway" in results:
        bars.append(("Classify, 32 clients: time/request, batching on vs off", 1 / results["gateway"]["classify_32_clients_batching_gain"]))
    if "generate" in results:
        bars.append(("Generate, 32 clients: time/token, batching on vs off", 1 / results["generate"]["generate_32_clients_batching_gain"]))
    if "batch" in results:
        bars.append(("batch job: time/record vs in-process loop", 1 / results["batch"]["batch_job_over_loop"]))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(bars) + 1))
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color="#4477aa")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("ratio to the same run's baseline (lower is better)")
    ax.set_title(f"tpcluster bench ({results['machine']})", fontsize=8)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(only: list[str] | None, repeats: int, json_path: str | None, chart_path: str | None,
        soak: tuple[int, float] = (8, 60.0)) -> dict[str, Any]:
    import cluster

    cluster.init()
    results: dict[str, Any] = {"machine": machine(), "repeats": repeats}
    for name in only or list(SECTIONS):
        if name == "soak":
            bench_soak(results, repeats, *soak)
        else:
            SECTIONS[name](results, repeats)
    results["summary"] = summary(results)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1))
    if chart_path:
        chart(results, chart_path)
    return results


def bench_decoder(results: dict[str, Any], repeats: int) -> None:
    """Tokens/s on the shipped pair: ours target-only and speculative (k = 2, 4, 6), transformers'
    generate and assisted generation in-process, greedy, batch 1, 64 new tokens."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cluster.generation import generate
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
    with parallel_model_load(folders["pair-target"]) as target, parallel_model_load(folders["pair-draft"]) as draft:
        def ours(**kwargs: Any) -> tuple[float, dict]:
            start, stats, sequences = time.perf_counter(), {}, []
            for p in ids:
                result = generate(target, [p], max_new_tokens=new, **kwargs)
                stats = result.stats
                sequences.append(result.sequences[0])
            return len(ids) * new / (time.perf_counter() - start), {"acceptance_rate": stats.get("acceptance_rate", 0.0),
                                                                     "mean_accepted_length": stats.get("mean_accepted_length", 0.0)}

        ours()
        out["target_only_tok_s"], _ = ours()
        for k in (2, 4, 6):
            rate, stats = ours(draft_model=draft, speculation_length=k)
            out[f"speculative_k{k}_tok_s"] = rate
            out[f"speculative_k{k}"] = stats
            out[f"speculative_k{k}_over_target_only"] = rate / out["target_only_tok_s"]
            out[f"speculative_k{k}_over_hf_assisted"] = rate / out["hf_assisted_tok_s"]
        out["target_only_over_hf_generate"] = out["target_only_tok_s"] / out["hf_generate_tok_s"]
        out["sample_text"] = tokenizer.decode(generate(target, [ids[0]], max_new_tokens=40).sequences[0])
    results["decoder"] = out


def _closed_loop(target: str, clients: int, seconds: float, request: Callable[[Any, int], int]) -> tuple[int, list[float], float]:
    """`clients` threads, each with its own Client, call `request(client, thread index)` back to back
    for `seconds`; returns (sum of what the calls returned, each call's latency, elapsed seconds)."""
    import concurrent.futures as futures

    from clients.client import Client

    stop = time.monotonic() + seconds
    counted, latencies = [0], []

    def worker(i: int) -> None:
        with Client(target, timeout=300) as client:
            while time.monotonic() < stop:
                began = time.perf_counter()
                counted[0] += request(client, i)
                latencies.append(time.perf_counter() - began)

    start = time.perf_counter()
    with futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return counted[0], latencies, time.perf_counter() - start


def _batching_gains(out: dict[str, Any], task: str, unit: str) -> None:
    for clients in (1, 8, 32):
        out[f"{task}_{clients}_clients_batching_gain"] = (out[f"{task}_batching_on_{clients}_clients_{unit}"]
                                                         / out[f"{task}_batching_off_{clients}_clients_{unit}"])


def bench_gateway(results: dict[str, Any], repeats: int) -> None:
    """The gateway's added latency over an in-process ParallelModel call, and Classify throughput at
    1/8/32 concurrent clients with dynamic batching on and off."""
    from actors.gateway.app import BackgroundGateway, ServeConfig
    from actors.gateway.batching import BatchingConfig
    from actors.gateway.server import GatewayConfig
    from clients.client import Client
    from cluster.models.defaults import ensure_defaults
    from cluster.trace import parallel_model_load

    folders = ensure_defaults()
    out: dict[str, Any] = {"setup": "MiniLM embedder/paraphrase, TP=2, buckets batch (1,4,16) x seq (32,128)"}
    enc = _inputs(32, 1)
    short = tuple(t[:1, :12] for t in enc)
    with parallel_model_load(folders["minilm-embed"]) as model:
        out["in_process_embed"] = latency_ms(lambda: model(*short), repeats)
    for name, batching in (("batching_on", BatchingConfig(max_batch_rows=16, max_wait_s=0.005, max_queue=1024)),
                           ("batching_off", BatchingConfig(max_batch_rows=1, max_wait_s=0.0, max_queue=1024))):
        served = BackgroundGateway(ServeConfig(models=folders, batching=batching, gateway=GatewayConfig(port=0)))
        try:
            with Client(served.target) as client:
                if name == "batching_on":
                    out["gateway_embed"] = latency_ms(lambda: client.embed([SENTENCES[0]], model="minilm-embed"), repeats)
                    out["gateway_added_p50_ms"] = out["gateway_embed"]["p50_ms"] - out["in_process_embed"]["p50_ms"]
                    out["gateway_added_p90_ms"] = out["gateway_embed"]["p90_ms"] - out["in_process_embed"]["p90_ms"]
                    out["gateway_added_p99_ms"] = out["gateway_embed"]["p99_ms"] - out["in_process_embed"]["p99_ms"]
                for clients in (1, 8, 32):
                    def classify(c: Any, _: int) -> int:
                        c.classify([(SENTENCES[0], SENTENCES[2])], model="minilm-paraphrase")
                        return 1

                    done, _, seconds = _closed_loop(served.target, clients, 6.0, classify)
                    out[f"classify_{name}_{clients}_clients_rps"] = done / seconds
        finally:
            served.close()
    _batching_gains(out, "classify", "rps")
    results["gateway"] = out


def bench_generate(results: dict[str, Any], repeats: int) -> None:
    """Generate throughput (tokens/s) through the gateway at 1/8/32 concurrent clients, continuous
    batching on (every KV-cache slot) and off (one sequence per replica)."""
    from actors.gateway.app import BackgroundGateway, ServeConfig
    from actors.gateway.batching import BatchingConfig
    from actors.gateway.server import GatewayConfig
    from cluster.models.defaults import ensure_decoders

    folders = {"pair-target": ensure_decoders()["pair-target"]}
    new, seconds = 32, 8.0
    prompts = ["The for statement is used to", "A class definition defines", "Return a new list containing",
               "The import statement", "An expression statement is", "The while loop"]
    out: dict[str, Any] = {"setup": f"shipped target TP=2, greedy, {new} new tokens per request, {seconds:.0f} s per point"}
    for name, sequences in (("batching_on", 0), ("batching_off", 1)):
        batching = BatchingConfig(max_queue=1024, max_sequences=sequences)
        served = BackgroundGateway(ServeConfig(models=folders, batching=batching, gateway=GatewayConfig(port=0)))
        try:
            if name == "batching_on":
                out["slots"] = served.models["pair-target"].schedulers[0].capacity
            for clients in (1, 8, 32):
                def generate(c: Any, i: int) -> int:
                    return c.generate(prompts[i % len(prompts)], model="pair-target", max_new_tokens=new).stats.generated_tokens

                tokens, latencies, elapsed = _closed_loop(served.target, clients, seconds, generate)
                out[f"generate_{name}_{clients}_clients_tok_s"] = tokens / elapsed
                out[f"generate_{name}_{clients}_clients_p50_s"] = statistics.median(latencies)
        finally:
            served.close()
    _batching_gains(out, "generate", "tok_s")
    results["generate"] = out


def bench_batch(results: dict[str, Any], repeats: int, records: int = 1000) -> None:
    """Batch-job throughput (records/s, clients.batch.run_batch with dynamic batching) against a plain
    in-process loop calling the same model (the same saved MiniLM embedder at TP=2) record by record."""
    import asyncio

    from transformers import AutoTokenizer

    from actors.gateway.app import ServeConfig, load_models
    from clients.batch import run_batch
    from cluster.models.bert import minilm_path
    from cluster.models.defaults import ensure_defaults
    from cluster.trace import parallel_model_load

    folder = ensure_defaults()["minilm-embed"]
    texts = [f"{SENTENCES[i % len(SENTENCES)]} (record {i})" for i in range(records)]
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    out: dict[str, Any] = {"setup": f"{records} records, MiniLM embedder TP=2, one process, local cluster"}
    with parallel_model_load(folder) as model:
        started = time.perf_counter()
        for text in texts:
            enc = tokenizer([text], return_tensors="pt")
            model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        out["in_process_loop_records_s"] = records / (time.perf_counter() - started)
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        source.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
        served = load_models(ServeConfig(models={"minilm-embed": folder}, resident=False))["minilm-embed"]
        try:
            started = time.perf_counter()
            counts = asyncio.run(run_batch(served, source, target, Path(tmp) / "errors.jsonl", log_every_s=1e9))
            out["batch_job_records_s"] = counts["written"] / (time.perf_counter() - started)
        finally:
            asyncio.run(served.close())
    out["batch_job_over_loop"] = out["batch_job_records_s"] / out["in_process_loop_records_s"]
    results["batch"] = out


def bench_soak(results: dict[str, Any], repeats: int, clients: int = 8, seconds: float = 60.0) -> None:
    from actors.gateway.app import BackgroundGateway, ServeConfig
    from actors.gateway.server import GatewayConfig
    from clients.soak import run_soak

    served = BackgroundGateway(ServeConfig(gateway=GatewayConfig(port=0)))
    try:
        tasks = {m.spec.task: name for name, m in served.models.items() if m.spec.task != "generate" or name == "pair-target"}
        results["soak"] = run_soak(served.target, tasks, clients=clients, seconds=seconds)
    finally:
        served.close()


SECTIONS.update({"decoder": bench_decoder, "gateway": bench_gateway, "generate": bench_generate, "batch": bench_batch,
                 "soak": bench_soak})
