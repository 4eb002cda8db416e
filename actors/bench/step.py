"""The `step` section: where a decode step's time goes, and decode speed against transformers.

For the shipped target at TP=1 and TP=2 (greedy, batch 1): tokens/s through the library API
against transformers' in-process `generate` on the same weights (measured right after, in the
same run), and the step split into the model's compute on rank 0, its collectives (with the
wait for the slower rank), and the rest (hops and bookkeeping: the step time seen by the caller
minus rank 0's graph call). At TP=2 also a single Generate stream through a gateway, against the
library API.
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
            transport = model.coordinator.describe_ranks()[0].get("collectives") or "none"
        baseline = hf_tok_s()
        rank0, steps = timings[0], max(1, timings[0]["runs"])
        step_ms, run_ms = 1000 * elapsed / steps, 1000 * rank0["run_s"] / steps
        collective_ms = 1000 * rank0["collective_s"] / steps
        out[f"tp{tp}"] = {
            "decode_tok_s": tokens / elapsed, "hf_generate_tok_s": baseline, "over_hf_generate": tokens / elapsed / baseline,
            "step_ms": step_ms, "compute_ms": run_ms - collective_ms, "collectives_ms": collective_ms,
            "collectives_per_step": rank0["collectives"] / steps, "collective_transport": transport,
            "hops_and_bookkeeping_ms": step_ms - run_ms, "steps": steps,
        }
        if tp == 2:
            out["gateway_stream_tok_s"] = _gateway_stream_tok_s(folder)
            out["gateway_over_library"] = out["gateway_stream_tok_s"] / out["tp2"]["decode_tok_s"]
    results["step"] = out


def _gateway_stream_tok_s(folder: Any) -> float:
    """One Generate stream at a time through a gateway serving `folder`: tokens/s."""
    from actors.gateway.app import BackgroundGateway, ServeConfig
    from actors.gateway.server import GatewayConfig
    from clients.client import Client

    served = BackgroundGateway(ServeConfig(models={"pair-target": folder}, gateway=GatewayConfig(port=0)))
    try:
        with Client(served.target) as client:
            client.generate(PROMPTS[0], model="pair-target", max_new_tokens=8)  # warm-up
            started, tokens = time.perf_counter(), 0
            for prompt in PROMPTS:
                tokens += client.generate(prompt, model="pair-target", max_new_tokens=NEW_TOKENS).stats.generated_tokens
            return tokens / (time.perf_counter() - started)
    finally:
        served.close()
