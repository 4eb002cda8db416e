"""The `long` section: long prompts on the shipped target (TP=2, its cache holds 511 tokens).

- Prefix reuse: time to first token of a request whose prompt is a 352-token shared prefix plus a
  32-token question, when the prefix is held by a kept cache row (the same prefix as the requests
  before it) against when it is not (a prefix of the same length no row holds), taking turns;
  both prompts are longer than the largest prompt bucket (128), so both go through chunked prefill.
- Chunked prefill under load: the inter-token latency (median and p99) of 4 running streams while
  a 384-token prompt joins every 0.5 s, against the same streams alone.
- Decode at long context: tokens/s of one stream after a 32-token and after a 416-token prompt.
Through the library API (`stream_generate`), greedy.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

SHARED, QUESTION, NEW = 352, 32, 16


def _tokens(seed: int, n: int, vocab: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def bench_long(results: dict[str, Any], repeats: int) -> None:
    from cluster.generation import stream_generate
    from cluster.models.defaults import ensure_decoders
    from cluster.trace import parallel_model_load

    out: dict[str, Any] = {"setup": f"shipped target TP=2, greedy; shared prefix {SHARED} + question {QUESTION} tokens, "
                                    f"{NEW} new tokens; chunks of 128"}
    with parallel_model_load(ensure_decoders()["pair-target"]) as model:
        vocab = int(model.coordinator.info().decoder["vocab_size"])

        def first_token_s(prompt: list[int], new: int = NEW) -> tuple[float, float]:
            """(seconds to the first token, decode tokens/s after it)."""
            started = time.perf_counter()
            stream = stream_generate(model, [prompt], max_new_tokens=new)
            first, count = None, 0
            for step in stream:
                count += len(step[0])
                if first is None and count:
                    first = time.perf_counter()
            done = time.perf_counter()
            return first - started, (count - 1) / max(done - first, 1e-9)

        shared = _tokens(1, SHARED, vocab)
        first_token_s(shared + _tokens(2, QUESTION, vocab))  # warm-up; leaves the prefix in a kept row
        held, cold = [], []
        for turn in range(max(5, repeats)):
            held.append(first_token_s(shared + _tokens(100 + turn, QUESTION, vocab))[0])
            cold.append(first_token_s(_tokens(200 + turn, SHARED, vocab) + _tokens(300 + turn, QUESTION, vocab))[0])
        out["ttft_reused_ms"] = 1000 * statistics.median(held)
        out["ttft_not_reused_ms"] = 1000 * statistics.median(cold)
        out["reuse_ttft_ratio"] = out["ttft_reused_ms"] / out["ttft_not_reused_ms"]

        def itl_ms(joining: bool) -> dict[str, float]:
            """Inter-token latency of 4 streams, with 384-token prompts joining every 0.5 s or not."""
            gaps: list[float] = []
            stop = threading.Event()

            def stream(seed: int) -> None:
                last = None
                for step in stream_generate(model, [_tokens(seed, 24, vocab)], max_new_tokens=96):
                    now = time.perf_counter()
                    if step[0]:
                        if last is not None:  # a client sees the first token of a step after the gap, the rest at once
                            gaps.extend([now - last] + [0.0] * (len(step[0]) - 1))
                        last = now

            def joiners() -> None:
                seed = 500
                while not stop.wait(0.5):
                    seed += 1
                    for _ in stream_generate(model, [_tokens(seed, 384, vocab)], max_new_tokens=2):
                        pass

            threads = [threading.Thread(target=stream, args=(400 + i,)) for i in range(4)]
            extra = threading.Thread(target=joiners) if joining else None
            for t in threads + ([extra] if extra else []):
                t.start()
            for t in threads:
                t.join()
            stop.set()
            if extra:
                extra.join()
            gaps.sort()
            return {"p50_ms": 1000 * statistics.median(gaps), "p99_ms": 1000 * gaps[int(0.99 * (len(gaps) - 1))]}

        out["itl_alone"] = itl_ms(False)
        out["itl_with_long_prompts_joining"] = itl_ms(True)
        short = first_token_s(_tokens(600, 32, vocab), 64)[1]
        long = first_token_s(_tokens(601, 416, vocab), 64)[1]
        out["decode_tok_s_context_32"], out["decode_tok_s_context_416"] = short, long
        out["long_context_decode_ratio"] = long / short
    results["long"] = out


__all__ = ["bench_long"]
