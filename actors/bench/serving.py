"""Benchmark sections through the gateway and the batch runner: gateway, generate, batch, soak.

torch, the cluster and the gateway are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from actors.bench.inputs import SENTENCES, minilm_inputs
from actors.bench.measure import batching_gains, closed_loop, latency_ms


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
    enc = minilm_inputs(32, 1)
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

                    done, _, seconds = closed_loop(served.target, clients, 6.0, classify)
                    out[f"classify_{name}_{clients}_clients_rps"] = done / seconds
        finally:
            served.close()
    batching_gains(out, "classify", "rps")
    results["gateway"] = out


def bench_generate(results: dict[str, Any], repeats: int) -> None:
    """Generate throughput (tokens/s) through the gateway at 1/8/32 concurrent clients, continuous
    batching on (every KV-cache slot) and off (one sequence per replica); and with batching on,
    every request speculating with the draft fused into the target (adaptive k: speculation_length 0),
    and with n-gram lookup (`[ngram]`, adaptive k) instead of a draft."""
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
            variants = [(name, "")] + ([("speculating", "pair-draft"), ("ngram", "[ngram]")] if name == "batching_on" else [])
            for clients in (1, 8, 32):
                for variant, draft in variants:
                    def generate(c: Any, i: int, draft: str = draft) -> int:
                        return c.generate(prompts[i % len(prompts)], model="pair-target", max_new_tokens=new,
                                          draft_model=draft).stats.generated_tokens

                    tokens, latencies, elapsed = closed_loop(served.target, clients, seconds, generate)
                    out[f"generate_{variant}_{clients}_clients_tok_s"] = tokens / elapsed
                    out[f"generate_{variant}_{clients}_clients_p50_s"] = statistics.median(latencies)
        finally:
            served.close()
    batching_gains(out, "generate", "tok_s")
    for clients in (1, 8, 32):
        out[f"generate_{clients}_clients_speculation_gain"] = (out[f"generate_speculating_{clients}_clients_tok_s"]
                                                               / out[f"generate_batching_on_{clients}_clients_tok_s"])
        out[f"generate_{clients}_clients_ngram_gain"] = (out[f"generate_ngram_{clients}_clients_tok_s"]
                                                         / out[f"generate_batching_on_{clients}_clients_tok_s"])
    results["generate"] = out


def bench_batch(results: dict[str, Any], repeats: int, records: int = 1000) -> None:
    """Batch-job throughput (records/s, actors.batch.run_batch with dynamic batching) against a plain
    in-process loop calling the same model (the same saved MiniLM embedder at TP=2) record by record."""
    import asyncio

    from transformers import AutoTokenizer

    from actors.batch import run_batch
    from actors.gateway.app import ServeConfig, load_models
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

