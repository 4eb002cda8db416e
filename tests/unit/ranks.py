"""Run a function as every rank of an in-process TP group (threads + thread collectives)."""

from __future__ import annotations

import concurrent.futures as futures
from typing import Any, Callable

from cluster.parallel_layers import parallel_state
from cluster.parallel_layers.collectives import ThreadCollectives


def run_ranks(world_size: int, fn: Callable[[int], Any]) -> list[Any]:
    group = ThreadCollectives(world_size, timeout_s=30)

    def body(rank: int) -> Any:
        with parallel_state.rank_context(rank, world_size, group.for_rank(rank)):
            return fn(rank)

    with futures.ThreadPoolExecutor(world_size) as pool:
        return [f.result(timeout=60) for f in [pool.submit(body, r) for r in range(world_size)]]
