"""The rank-group interface the coordinator drives, and its in-process implementation.

A rank group fans one typed call out to every rank and waits once, with a timeout, for all of
them. `actors.rank_group.RayRankGroup` does it with one Ray actor per rank; `InProcessRankGroup`
does it with one thread per rank (eager backend, thread collectives) so the coordinator can be
tested without Ray.
"""

from __future__ import annotations

import concurrent.futures as futures
import traceback
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Sequence

import torch

from cluster.errors import ClusterError, RankError, RankFailure
from cluster.parallel_layers import parallel_state
from cluster.parallel_layers.collectives import ThreadCollectives
from cluster.rank import RankExport, RankWorker
from cluster.trace.artifact import ShardPlan, plan_shards
from cluster.trace.config import TraceSpec

if TYPE_CHECKING:
    from cluster.generation.plan import Call


def rank_exception(rank: int, exc: BaseException, remote_traceback: str) -> ClusterError:
    """The error to raise for an exception inside a rank: ours keep their type, others become RankError."""
    if isinstance(exc, RankError):
        return exc
    if isinstance(exc, ClusterError):
        try:
            return type(exc)(f"rank {rank}: {exc}")
        except TypeError:
            pass
    return RankError(rank, f"{type(exc).__name__}: {exc}", remote_traceback)


class RankGroup(ABC):
    """Typed calls to every rank of one TP group, each answered within `timeout` seconds."""

    world_size: int

    @abstractmethod
    def _fan_out(self, method: str, args: Sequence[tuple], timeout: float, ranks: Sequence[int] | None = None) -> list[Any]:
        """Call `method(*args[i])` on rank ranks[i] (all ranks by default); wait once for all."""

    @abstractmethod
    def form_group(self, timeout: float, threads: int) -> None:
        """Join every rank into one collective group on a fresh rendezvous."""

    @abstractmethod
    def close(self) -> None: ...

    def _same(self, method: str, timeout: float, *args: Any) -> list[Any]:
        return self._fan_out(method, [args] * self.world_size, timeout)

    def describe(self, timeout: float) -> list[dict[str, Any]]:
        return self._same("describe", timeout)

    def ping(self, timeout: float) -> list[int]:
        return self._same("ping", timeout)

    def build(self, spec: TraceSpec, timeout: float) -> list[dict[str, Any]]:
        return self._same("build", timeout, spec)

    def trace_bucket(self, bucket: int, example: tuple, timeout: float, ranks: Sequence[int] | None = None,
                     return_graph: bool = False) -> list[tuple[float, bytes | None]]:
        ranks = list(range(self.world_size)) if ranks is None else list(ranks)
        return self._fan_out("trace_bucket", [(bucket, example, return_graph)] * len(ranks), timeout, ranks)

    def adopt_graph(self, bucket: int, blob: bytes, ranks: Sequence[int], timeout: float) -> list[float]:
        return self._fan_out("adopt_graph", [(bucket, blob)] * len(ranks), timeout, ranks)

    def verify_bucket(self, bucket: int, example: tuple, timeout: float) -> list[float]:
        return self._same("verify_bucket", timeout, bucket, example)

    def finish_trace(self, timeout: float) -> None:
        self._same("finish_trace", timeout)

    def run(self, call: Call, timeout: float) -> Any:
        """One serving call (a cluster.generation.plan type) on every rank; rank 0's answer."""
        return self._same("run", timeout, call)[0]

    def compile_graphs(self, buckets: Sequence[int] | None, timeout: float) -> list[list[tuple[int, float, bool]]]:
        """Every rank's bucket graphs compiled to machine code (cluster.trace.compiled); per rank, per
        bucket: (bucket, seconds, whether that rank compiled it rather than loading another's)."""
        return self._same("compile_graphs", timeout, buckets)

    def export(self, timeout: float) -> list[RankExport]:
        return self._same("export", timeout)

    def save(self, folder: str, timeout: float) -> tuple[ShardPlan, list[dict[str, dict[str, Any]]]]:
        """Every rank writes its own files of a saved model into `folder` (no weight leaves a rank):
        the plan they followed (artifact.plan_shards) and the manifest entries each wrote."""
        plan = plan_shards(self._same("shard_digests", timeout))
        written = self._fan_out("write_shard", [(folder, plan.writes[r], plan.shared, r == 0)
                                                for r in range(self.world_size)], timeout)
        return plan, written

    def load(self, backend: str, graphs: Sequence[list[bytes]], weights: Sequence[dict | None], threads: int,
             aliases: dict[str, int], timeout: float, ranks: Sequence[int] | None = None) -> None:
        """Each rank's graphs and weights (graphs[r], weights[r]) onto rank r: every rank, or `ranks`."""
        ranks = list(range(self.world_size)) if ranks is None else list(ranks)
        self._fan_out("load", [(backend, graphs[r], weights[r], threads, aliases) for r in ranks], timeout, ranks)

    def load_draft(self, graphs: list[bytes], weights: dict | None, aliases: dict[str, int], timeout: float,
                   ranks: Sequence[int] | None = None) -> None:
        """The same whole (TP=1) draft onto every rank (or `ranks`), beside its shard (fused speculation)."""
        ranks = list(range(self.world_size)) if ranks is None else list(ranks)
        self._fan_out("load_draft", [(graphs, weights, aliases)] * len(ranks), timeout, ranks)

    def timings(self, reset: bool, timeout: float) -> list[dict[str, float]]:
        return self._same("timings", timeout, reset)

    def weight_specs(self, timeout: float) -> list[dict[str, Any]]:
        return self._same("weight_specs", timeout)

    def replace_weights(self, states: Sequence[dict[str, torch.Tensor]], timeout: float) -> None:
        self._fan_out("replace_weights", [(s,) for s in states], timeout)


class InProcessRankGroup(RankGroup):
    """Ranks as threads of this process: eager shards, thread collectives. For tests and TP on one box."""

    def __init__(self, world_size: int, collective_timeout_s: float = 60.0) -> None:
        self.world_size = world_size
        self._collectives = ThreadCollectives(world_size, collective_timeout_s)
        self._workers: list[RankWorker] = []
        self._threads = []
        for rank in range(world_size):
            view = self._collectives.for_rank(rank)
            pool = futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"rank{rank}",
                initializer=parallel_state.set_thread_rank, initargs=(rank, world_size, view),
            )
            self._threads.append(pool)
            self._workers.append(pool.submit(RankWorker, rank, world_size, view).result())

    def form_group(self, timeout: float, threads: int) -> None:
        return None  # the thread collectives were formed at construction

    def _fan_out(self, method, args, timeout, ranks=None):
        ranks = list(range(self.world_size)) if ranks is None else list(ranks)
        pending = [self._threads[r].submit(getattr(self._workers[r], method), *a) for r, a in zip(ranks, args)]
        done, not_done = futures.wait(pending, timeout=timeout)
        if not_done:
            stalled = [r for r, f in zip(ranks, pending) if f in not_done]
            raise RankFailure(stalled[0], f"{method} did not answer within {timeout:.0f} s (ranks {stalled})")
        results = []
        for rank, future in zip(ranks, pending):
            exc = future.exception()
            if exc is not None:
                raise rank_exception(rank, exc, "".join(traceback.format_exception(exc))) from exc
            results.append(future.result())
        return results

    def close(self) -> None:
        for pool in self._threads:
            pool.shutdown(wait=False, cancel_futures=True)
        self._threads = []


__all__ = ["InProcessRankGroup", "RankGroup", "rank_exception"]
