"""`tpcluster bench`: every figure is a ratio to an in-process baseline measured in the same run.

Sections (pick with --only): core (eager vs ParallelModel TP=1/2, trace time), separation
(artifact bytes and load time, separated vs inlined), buckets (16-token latency with buckets
[128, 512] vs one 512 bucket), trace_once (trace time at TP 1/2/4, once vs per rank), decoder
(the shipped pair, ours vs transformers), step (a decode step's breakdown at TP 1/2, and decode
tok/s over transformers' generate), gateway, generate, batch and soak (through a gateway), fronts
(one Embed call through tpcluster.v1, the Open Inference Protocol and the OpenAI HTTP API), compile
(first and second start of a checkpoint through the compile cache), failover (two replicas of every
model, a rank killed every minute under mixed load: failures, stream agreement, rebuilds, memory),
serving (`vllm bench serve` against the gateway's OpenAI port and against vLLM's CPU build serving the
same checkpoint: output tok/s, TTFT, TPOT, ITL at concurrency 1/8/32; skipped without `vllm`), long
(long prompts: time to first token with and without a reused prefix, streams' inter-token latency
while long prompts join in chunks, decode at long context).

Importing this package imports neither torch nor the cluster; each section does when it runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from actors.bench import compile_cache, failover, fronts, long, scale, sections, serving, step, vllm_serving
from actors.bench.inputs import SENTENCES
from actors.bench.measure import machine
from actors.bench.report import chart, summary

__all__ = ["SECTIONS", "SENTENCES", "run"]

SECTIONS = {
    "core": sections.bench_core, "separation": sections.bench_separation, "buckets": sections.bench_buckets,
    "trace_once": sections.bench_trace_once, "decoder": sections.bench_decoder, "step": step.bench_step,
    "gateway": serving.bench_gateway,
    "generate": serving.bench_generate, "batch": serving.bench_batch, "soak": serving.bench_soak,
    "fronts": fronts.bench_fronts, "compile": compile_cache.bench_compile, "failover": failover.bench_failover,
    "scale": scale.bench_scale, "serving": vllm_serving.bench_serving, "long": long.bench_long,
}


def run(only: list[str] | None, repeats: int, json_path: str | None, chart_path: str | None,
        soak: tuple[int, float] = (8, 60.0), failover_minutes: float = 10.0) -> dict[str, Any]:
    """Run the sections named in `only` (all by default) on a local cluster; returns every figure and
    a one-line "summary", and writes them as JSON to `json_path` and a chart to `chart_path` if given."""
    import cluster

    names = only or list(SECTIONS)
    # failover serves every model twice over: the local cluster must advertise enough logical cores
    cluster.init(neuron_cores=failover.NEURON_CORES if "failover" in names else None)
    results: dict[str, Any] = {"machine": machine(), "repeats": repeats}
    for name in names:
        if name == "soak":
            serving.bench_soak(results, repeats, *soak)
        elif name == "failover":
            failover.bench_failover(results, repeats, minutes=failover_minutes)
        else:
            SECTIONS[name](results, repeats)
    results["summary"] = summary(results)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1))
    if chart_path:
        chart(results, chart_path)
    return results
