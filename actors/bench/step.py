"""The `step` section: where a decode step's time goes, and decode speed against transformers.

For the shipped target at TP=1 and TP=2 (greedy, batch 1): tokens/s through the library API
against transformers' in-process `generate` on the same weights (measured right after, in the
same run), and the step split into the model's compute on rank 0, its collectives (with the
wait for the slower rank), and the rest (hops and bookkeeping: the step time seen by the caller
minus rank 0's graph call). Then the same with the graphs it ran compiled to machine code
(AOTInductor, cluster.trace.compiled; the compile's seconds reported, a cached package's load when
the machine has one). At TP=2 also a single Generate stream through a gateway, against the
library API on the same replica (the gateway's): the two take turns (`repeats` times, at least 5)
on the same ranks, coordinator and measured step costs, so that only the path differs and both see
the same load on the machine. Each reports the rounds it took (a round is one step of the
coordinator's batch, of one or more decode steps: multi-step decoding); the gateway also the gRPC
messages per token.
"""

from __future__ import annotations

import time
from typing import Any

PROMPTS = ["The for statement is used to", "A class definition defines", "Return a new list containing"]
NEW_TOKENS = 64


def bench_step(results: dict[str, Any], repeats: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cluster.generation import generate
    from cluster.models.defaults import ensure_decoders
    from cluster.models.pair import pair_path, target_path
    from cluster.trace import parallel_model_load

    tokenizer = AutoTokenizer.from_pretrained(pair_path())
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    hf = LlamaForCausalLM.from_pretrained(target_path(), dtype=torch.float32).eval()

    def hf_tok_s() -> float:
        started, tokens = time.perf_counter(), 0
        for p in ids:
            out = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)
            tokens += out.shape[1] - len(p)
        return tokens / (time.perf_counter() - started)

    out: dict[str, Any] = {"setup": f"shipped target, greedy, batch 1, up to {NEW_TOKENS} new tokens, "
                                    f"{len(PROMPTS)} prompts; transformers generate in-process, same weights"}
    hf_tok_s()  # warm-up
    for tp in (1, 2):
        folder = ensure_decoders(target_tp=tp)["pair-target"]
        with parallel_model_load(folder) as model:
            generate(model, [ids[0]], max_new_tokens=8)  # warm-up
            model.coordinator.rank_timings(reset=True)
            started, tokens = time.perf_counter(), 0
            for p in ids:
                tokens += len(generate(model, [p], max_new_tokens=NEW_TOKENS).sequences[0])
            elapsed = time.perf_counter() - started
            timings = model.coordinator.rank_timings(reset=True)
            described = model.coordinator.describe_ranks()[0]
            transport = described.get("collectives") or "none"
            rank_calls = described.get("rank_calls", "")
            compiled = _compiled(model, ids)
        baseline = hf_tok_s()
        rank0, steps = timings[0], max(1, timings[0]["runs"])
        step_ms, run_ms = 1000 * elapsed / steps, 1000 * rank0["run_s"] / steps
        collective_ms = 1000 * rank0["collective_s"] / steps
        out[f"tp{tp}"] = {
            "decode_tok_s": tokens / elapsed, "hf_generate_tok_s": baseline, "over_hf_generate": tokens / elapsed / baseline,
            "step_ms": step_ms, "compute_ms": run_ms - collective_ms, "collectives_ms": collective_ms,
            "collectives_per_step": rank0["collectives"] / steps, "collective_transport": transport,
            "hops_and_bookkeeping_ms": step_ms - run_ms, "steps": steps, "rank_calls": rank_calls,
            "compiled_tok_s": compiled["tok_s"], "compiled_over_interpreted": compiled["tok_s"] / (tokens / elapsed),
            "compiled_over_hf_generate": compiled["tok_s"] / baseline, "compiled_graphs": compiled["graphs"],
        }
    gateway = _gateway_against_library(folder, ids, max(5, repeats))  # folder: the TP=2 one
    out["gateway_stream_tok_s"], out["gateway_over_library"] = gateway["gateway_tok_s"], gateway["gateway_over_library"]
    out["gateway_detail"] = gateway
    results["step"] = out


def _compiled(model: Any, ids: list[list[int]]) -> dict[str, Any]:
    """Decode tokens/s on `model` once the graphs these prompts run (their prefill and the decode
    graphs up to NEW_TOKENS on) are compiled, and per graph the seconds it took to compile (or to
    load, from this machine's cache)."""
    from cluster.generation import DecoderLayout, generate
    from cluster.generation.layout import prefill_inputs, step_inputs

    layout = DecoderLayout.from_json(model.coordinator.info().decoder["layout"])
    buckets = {prefill_inputs(layout, [p])[0] for p in ids}
    buckets |= {step_inputs(layout, "decode", [[0]], [start])[0]
                for p in ids for start in range(len(p), len(p) + NEW_TOKENS + 1)}
    graphs = model.coordinator.compile_graphs(sorted(buckets))
    generate(model, [ids[0]], max_new_tokens=8)  # warm-up
    started, tokens = time.perf_counter(), 0
    for p in ids:
        tokens += len(generate(model, [p], max_new_tokens=NEW_TOKENS).sequences[0])
    return {"tok_s": tokens / (time.perf_counter() - started),
            "graphs": [{"bucket": b, "seconds": s, "compiled": made} for b, s, made in graphs]}


def _gateway_against_library(folder: Any, ids: list[list[int]], turns: int) -> dict[str, Any]:
    """One Generate stream at a time through a gateway serving `folder`, and the library API on the
    gateway's replica, taking turns: median tokens/s of each and of their ratio per turn, rounds per
    generation and tokens per round of each, and gRPC messages per streamed token."""
    import statistics

    from actors.gateway.app import BackgroundGateway, ServeConfig
    from actors.gateway.server import GatewayConfig
    from clients.client import Client
    from cluster.generation import stream_generate
    from cluster.trace.model import ParallelModel

    served = BackgroundGateway(ServeConfig(models={"pair-target": folder}, gateway=GatewayConfig(port=0)))
    scheduler = served.models["pair-target"].schedulers[0]
    model = ParallelModel(scheduler.replica.coordinator)  # not closed here: the gateway holds the replica

    def library() -> tuple[int, int]:
        tokens = rounds = 0
        for p in ids:
            stream = stream_generate(model, [p], max_new_tokens=NEW_TOKENS)
            rounds += sum(1 for _ in stream)  # one item per round that made tokens
            tokens += len(stream.output.sequences[0])
        return tokens, rounds

    def gateway(client: Client) -> tuple[int, int, int]:
        tokens = messages = 0
        before = scheduler.rounds
        for prompt in PROMPTS:
            for event in client.generate_stream(prompt, model="pair-target", max_new_tokens=NEW_TOKENS):
                messages += 1
                if event.HasField("stats"):
                    tokens += event.stats.generated_tokens
        return tokens, scheduler.rounds - before, messages

    runs: dict[str, list] = {"library": [], "gateway": []}
    try:
        with Client(served.target) as client:
            client.generate(PROMPTS[0], model="pair-target", max_new_tokens=8)  # warm-up
            for _ in range(turns):
                started = time.perf_counter()
                tokens, rounds = library()
                runs["library"].append((tokens / (time.perf_counter() - started), tokens, rounds))
                started = time.perf_counter()
                tokens, rounds, messages = gateway(client)
                runs["gateway"].append((tokens / (time.perf_counter() - started), tokens, rounds, messages))
    finally:
        served.close()
    lib, gw = runs["library"], runs["gateway"]
    return {
        "turns": turns, "library_tok_s": statistics.median(r[0] for r in lib),
        "gateway_tok_s": statistics.median(r[0] for r in gw),
        "gateway_over_library": statistics.median(g[0] / b[0] for g, b in zip(gw, lib)),
        "gateway_over_library_per_turn": [round(g[0] / b[0], 3) for g, b in zip(gw, lib)],
        "library_tokens_per_round": sum(r[1] for r in lib) / max(1, sum(r[2] for r in lib)),
        "gateway_tokens_per_round": sum(r[1] for r in gw) / max(1, sum(r[2] for r in gw)),
        "library_rounds_per_generation": sum(r[2] for r in lib) / (turns * len(ids)),
        "gateway_rounds_per_generation": sum(r[2] for r in gw) / (turns * len(PROMPTS)),
        "grpc_messages_per_token": sum(r[3] for r in gw) / max(1, sum(r[1] for r in gw)),
    }
