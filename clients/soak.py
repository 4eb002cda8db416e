"""A soak of the gateway: N clients for M seconds with good, bad, cancelled and over-deadline requests.

Counts outcomes by status code, latency percentiles of the good requests, and memory of the gateway
process and of every rank at start and end. `crashes` counts what must never happen: INTERNAL or
UNKNOWN statuses, and requests that never got an answer (lost).
"""

from __future__ import annotations

import collections
import os
import random
import statistics
import threading
import time
from typing import Any

import numpy as np

from clients import errors
from clients.client import Client

SENTENCES = ["Tensor parallelism splits every layer across cores", "The for statement iterates over a sequence",
             "Apples are especially bad for your health", "A replica rebuilds itself after losing a rank"]


def _rss(pid: int | None = None) -> int:
    try:
        with open(f"/proc/{pid or os.getpid()}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _ranks_memory(client: Client) -> dict[str, int]:
    status = client.status()
    return {f"{m.name}/r{rep.index}/rank{rank.rank}": rank.memory_bytes for m in status.models for rep in m.replicas for rank in rep.ranks}


def _requests(models: dict[str, str]) -> list[tuple[str, float, Any]]:
    """(kind, weight, call(client, rng)) for the models the gateway serves."""
    embed, classify, gen = models.get("embed"), models.get("classify"), models.get("generate")
    mix: list[tuple[str, float, Any]] = []
    if embed:
        mix += [
            ("good", 4, lambda c, r: c.embed(r.sample(SENTENCES, r.randint(1, 3)), model=embed)),
            ("bad", 1, lambda c, r: c.embed([""], model=embed)),
            ("bad", 1, lambda c, r: c.embed(["x"], model="no-such-model")),
            ("bad", 1, lambda c, r: c.embed(["word " * 400], model=embed)),
            ("bad", 1, lambda c, r: c.infer(embed, [np.zeros((1, 3), np.float32)])),
            ("deadline", 1, lambda c, r: c.embed(SENTENCES, model=embed, timeout=0.0005)),
        ]
    if classify:
        mix.append(("good", 2, lambda c, r: c.classify([(r.choice(SENTENCES), r.choice(SENTENCES))], model=classify)))
    if gen:
        mix += [
            ("good", 1, lambda c, r: c.generate("The for statement", model=gen, max_new_tokens=8)),
            ("bad", 1, lambda c, r: c.generate("", model=gen)),
            ("bad", 1, lambda c, r: c.generate("x", model=gen, temperature=-1.0)),
            ("cancelled", 1, _cancelled(gen)),
        ]
    return mix


def _cancelled(model: str):
    def call(client: Client, rng: random.Random) -> None:
        stream = client.generate_stream("A class definition", model=model, max_new_tokens=64)
        next(stream)
        stream.close()
    return call


def run_soak(target: str, models: dict[str, str], clients: int = 8, seconds: float = 30.0, seed: int = 0,
             per_client: int | None = None) -> dict[str, Any]:
    """Drive the gateway at `target`; models maps task (embed/classify/generate) to a served model name.

    Each client sends requests for `seconds`, or, with `per_client`, exactly that many (a test's
    fixed workload, independent of the machine's speed).
    """
    mix = _requests(models)
    weights = [w for _, w, _ in mix]
    outcomes: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    started_calls = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    with Client(target, retries=0, timeout=60) as probe:
        memory_start = {"gateway_process": _rss(), **_ranks_memory(probe)}

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        with Client(target, retries=0, timeout=60) as client:
            sent = 0
            while (sent < per_client) if per_client is not None else (time.monotonic() < stop_at):
                sent += 1
                kind, _, call = rng.choices(mix, weights)[0]
                with lock:
                    started_calls[0] += 1
                begin = time.perf_counter()
                try:
                    call(client, rng)
                    code = "OK"
                except errors.TpClusterError as exc:
                    code = exc.code.name
                except Exception as exc:  # anything else is a defect the soak must surface
                    code = f"CLIENT_{type(exc).__name__}"
                elapsed = time.perf_counter() - begin
                with lock:
                    outcomes[f"{kind}:{code}"] += 1
                    if kind == "good" and code == "OK":
                        latencies.append(elapsed)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, stop_at - time.monotonic()) + 120 if per_client is None else None)
    hung = sum(t.is_alive() for t in threads)
    with Client(target, retries=0, timeout=60) as probe:
        memory_end = {"gateway_process": _rss(), **_ranks_memory(probe)}
        still_serving = probe.health() == "SERVING"
    answered = sum(outcomes.values())
    bad_codes = {k: v for k, v in outcomes.items() if k.split(":")[1] in ("INTERNAL", "UNKNOWN") or k.split(":")[1].startswith("CLIENT_")}
    latencies.sort()
    return {
        "clients": clients, "seconds": seconds, "requests": started_calls[0], "answered": answered,
        "lost": started_calls[0] - answered + hung, "crashes": sum(bad_codes.values()), "still_serving": still_serving,
        "by_outcome": dict(sorted(outcomes.items())),
        "good_p50_ms": statistics.median(latencies) * 1e3 if latencies else 0.0,
        "good_p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1e3 if latencies else 0.0,
        "memory_start_mb": {k: round(v / 2**20, 1) for k, v in memory_start.items()},
        "memory_end_mb": {k: round(v / 2**20, 1) for k, v in memory_end.items()},
    }
