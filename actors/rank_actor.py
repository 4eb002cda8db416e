"""The Ray actor that hosts one rank: a thin shell over cluster.rank.RankWorker."""

from __future__ import annotations

from typing import Any

import ray

from cluster.rank import RankWorker


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=1)
class RankActor:
    def __init__(self, rank: int, world_size: int) -> None:
        self._worker = RankWorker(rank, world_size, node=ray.util.get_node_ip_address())

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self._worker, method)(*args)

    def rendezvous(self) -> tuple[str, int]:
        return self._worker.pick_rendezvous(ray.util.get_node_ip_address())
