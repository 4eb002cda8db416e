"""Timing helpers of the benchmark: latency percentiles, wall time, and a closed-loop load driver."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable, ContextManager


def machine() -> str:
    import torch

    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}, torch {torch.__version__}, no accelerator"


def latency_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return percentiles_ms(samples)


def percentiles_ms(samples: list[float]) -> dict[str, float]:
    """p50 (the median), p90 and p99 (nearest rank, rounded down) of latencies in ms."""
    if not samples:
        raise ValueError("no latency samples: at least one call must be timed")
    ordered = sorted(samples)
    return {"p50_ms": statistics.median(ordered), "p90_ms": ordered[int(0.9 * (len(ordered) - 1))],
            "p99_ms": ordered[int(0.99 * (len(ordered) - 1))]}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _gateway_client(target: str) -> ContextManager[Any]:
    from clients.client import Client

    return Client(target, timeout=300)


def closed_loop(target: str, clients: int, seconds: float, request: Callable[[Any, int], int], *,
                connect: Callable[[str], ContextManager[Any]] = _gateway_client) -> tuple[int, list[float], float]:
    """`clients` threads, each with its own client (`connect(target)`: a Client by default), call
    `request(client, thread index)` back to back for `seconds`; returns (sum of what the calls
    returned, each call's latency, elapsed seconds)."""
    import concurrent.futures as futures

    stop = time.monotonic() + seconds
    # One slot per thread: a shared `total += request(...)` reads the total before the call
    # blocks, so concurrent threads would overwrite each other's counts.
    counted = [0] * clients
    latencies: list[list[float]] = [[] for _ in range(clients)]

    def worker(i: int) -> None:
        with connect(target) as client:
            while time.monotonic() < stop:
                began = time.perf_counter()
                counted[i] += request(client, i)
                latencies[i].append(time.perf_counter() - began)

    start = time.perf_counter()
    with futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return sum(counted), [s for thread in latencies for s in thread], time.perf_counter() - start


def batching_gains(out: dict[str, Any], task: str, unit: str) -> None:
    for clients in (1, 8, 32):
        out[f"{task}_{clients}_clients_batching_gain"] = (out[f"{task}_batching_on_{clients}_clients_{unit}"]
                                                         / out[f"{task}_batching_off_{clients}_clients_{unit}"])
