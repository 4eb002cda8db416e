"""The coordinator: forms a TP group, traces or loads its shards, picks buckets, serves calls.

A plain class over a RankGroup, so it runs in-process in tests; `actors.coordinator_actor`
hosts it in a Ray actor for the cluster. Only inputs and rank 0's outputs pass through it. It
drives its rank group and nothing else: generation serving (the decode batch, the generate_*
calls) is cluster.generation_service over `run`; a lost rank, the rebuild and hot spares are
cluster.recovery; its bounds are cluster.coordinator_config.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from cluster.buckets import run_kernel
from cluster.coordinator_config import CoordinatorConfig
from cluster.errors import ClusterError, InputError
from cluster.generation.plan import Call, Forward
from cluster.generation.types import GenerationRound
from cluster.generation_service import GenerationService
from cluster.handle import AsyncOverThreads, CoordinatorInfo
from cluster.rank_group import RankGroup
from cluster.recovery import Recovery
from cluster.signature import Signature, as_input_tuple, describe_signature, signature_of
from cluster.trace import artifact
from cluster.trace.backends import get_backend
from cluster.trace.config import TraceSpec
from cluster.trace.state import Exported, ModelState

_log = logging.getLogger("tpcluster.coordinator")


class Coordinator(Recovery):
    """Drives one TP group. With `rank_group_factory`, a replica that loses a rank rebuilds itself
    (cluster.recovery): new rank actors, a new rendezvous, the shards reloaded from what it was
    loaded with."""

    def __init__(self, ranks: RankGroup, config: CoordinatorConfig | None = None,
                 rank_group_factory: Callable[[], RankGroup] | None = None) -> None:
        super().__init__(rank_group_factory)
        self.ranks = ranks
        self.config = config or CoordinatorConfig()
        self.state: ModelState | None = None
        self._kernel = None
        self._spec: TraceSpec | None = None
        self._started = False
        self._draft_buckets: list[Signature] = []  # a fused draft's bucket signatures
        self.generation = GenerationService(self.run, lambda: self.state.extra if self.state else {},
                                            self._serving, self._check_serving)
        self.streams = self.generation.streams  # its lock serialises every call (actors.coordinator_actor)
        self.aio = AsyncOverThreads(self)

    def start(self) -> list[dict[str, Any]]:
        """Form the collective group on a fresh rendezvous; returns where each rank runs."""
        self.ranks.form_group(self.config.rendezvous_timeout_s, self._threads())
        self._started = True
        return self.ranks.describe(self.config.call_timeout_s)

    def _threads(self) -> int:
        return self.config.threads_per_rank or max(1, (os.cpu_count() or 1) // self.ranks.world_size)

    # -- tracing ----------------------------------------------------------------------------
    def build(self, spec: TraceSpec, kernel: bytes | None) -> None:
        infos = self.ranks.build(spec, self.config.trace_timeout_s)
        self._spec = spec
        self.state = ModelState(
            tp_degree=spec.tp_degree, backend=spec.backend, inline_weights=spec.inline_weights,
            buckets=list(spec.bucket_signatures), kernel=kernel,
            partition_dims=infos[0]["partition_dims"], state_keys=infos[0]["state_keys"],
            io_aliases=infos[0]["io_aliases"], extra=dict(spec.extra),
        )
        self._set_kernel(kernel)
        shapes = [info["weights"] for info in infos]
        self._ranks_alike = all(s == shapes[0] for s in shapes)

    def trace_bucket(self, bucket: int, example: tuple[torch.Tensor, ...]) -> dict[str, Any]:
        """Trace one bucket on the ranks: once on rank 0 when the graphs can be shared, else per rank."""
        spec, timeout = self._spec, self.config.trace_timeout_s
        once = (
            self.ranks.world_size > 1 and spec.spmd_mode is not False and get_backend(spec.backend).shares_graphs
            and not spec.inline_weights and self._ranks_alike
        )
        start = time.perf_counter()
        if once:
            seconds, blob = self.ranks.trace_bucket(bucket, example, timeout, ranks=[0], return_graph=True)[0]
            if self.ranks.world_size > 1:
                self.ranks.adopt_graph(bucket, blob, list(range(1, self.ranks.world_size)), timeout)
            diffs = self.ranks.verify_bucket(bucket, example, timeout)
            if max(diffs) > self.config.verify_tolerance:
                if spec.spmd_mode:
                    raise ClusterError(
                        f"spmd_mode=True but rank 0's graph for bucket {bucket} gives different results on "
                        f"other ranks (max diff {max(diffs):.3g}): the model's forward depends on the rank; "
                        "trace with spmd_mode=False"
                    )
                once = False
        if not once:
            self.ranks.trace_bucket(bucket, example, timeout)
        self.state.trace_mode.append("once" if once or self.ranks.world_size == 1 else "per-rank")
        return {"bucket": bucket, "mode": self.state.trace_mode[-1], "seconds": time.perf_counter() - start}

    def finish_trace(self) -> None:
        self.ranks.finish_trace(self.config.call_timeout_s)

    # -- loading ----------------------------------------------------------------------------
    def load(self, state: ModelState, graphs: Sequence[list[bytes]], weights: Sequence[dict | None],
             draft: tuple[ModelState, list[bytes], dict | None] | None = None) -> None:
        """Load each rank's shard; with `draft` (a TP=1 draft's state, graphs and weights), the whole
        draft onto every rank too, for fused speculation (see cluster.trace.fused)."""
        from cluster.trace.fused import fused_draft_info

        fused = fused_draft_info(state, draft[0]) if draft is not None else None
        self.ranks.load(state.backend, graphs, weights, self._threads(), state.io_aliases, self.config.trace_timeout_s)
        if draft is not None:
            self.ranks.load_draft(draft[1], draft[2], draft[0].io_aliases, self.config.trace_timeout_s)
            state.extra = {**state.extra, "fused_draft": fused}
            self._draft_buckets = list(draft[0].buckets)
        self.state = state
        self._payload = (graphs, weights, draft)
        self._set_kernel(state.kernel)
        if self.config.compile_graphs:
            self.compile_graphs()

    def compile_graphs(self, buckets: Sequence[int] | None = None) -> list[tuple[int, float, bool]]:
        """Compile the ranks' bucket graphs (all, or `buckets`) to machine code and run them from now on
        (cpu backend: cluster.trace.compiled; other backends compile at trace time). Per bucket:
        (bucket, seconds on the slowest rank, whether a rank compiled it rather than found it)."""
        self._compiled_buckets = None if buckets is None else list(buckets)
        self.config = dataclasses.replace(self.config, compile_graphs=True)  # a rebuilt rank compiles (finds) them too
        per_rank = self.ranks.compile_graphs(buckets, self.config.trace_timeout_s)
        done = [(rows[0][0], max(r[1] for r in rows), any(r[2] for r in rows)) for rows in zip(*per_rank)]
        for bucket, seconds, made in done:
            _log.info("bucket %d graph %s in %.1f s", bucket, "compiled" if made else "package loaded", seconds)
        return done

    def _set_kernel(self, kernel: bytes | None) -> None:
        self._kernel = torch.jit.load(io.BytesIO(kernel)) if kernel else None

    # -- serving ----------------------------------------------------------------------------
    def forward(self, inputs: Any) -> Any:
        if self.state is None:
            raise ClusterError("the coordinator holds no model; trace or load one first")
        inputs = as_input_tuple(inputs)
        if self._kernel is not None:
            bucket, inputs = run_kernel(self._kernel, inputs, self.state.buckets)
        else:
            bucket = 0
            self._check_signature(inputs, self.state.buckets[0])
        return self._serving(lambda: self.ranks.run(Forward(bucket, inputs), self.config.call_timeout_s))

    def run(self, call: Call) -> Any:
        """One call of the decoder's steps on every rank (cluster.generation.plan: a bucket graph with
        inputs already shaped for it, several decode steps, a draft's proposals, a fused round)."""
        if self.state is None:
            raise ClusterError("the coordinator holds no model; trace or load one first")
        if isinstance(call, Forward):
            buckets = self._draft_buckets if call.draft else self.state.buckets
            if not 0 <= call.bucket < len(buckets):
                raise InputError("this model holds no fused draft" if call.draft and not buckets
                                 else f"{'fused draft ' if call.draft else ''}bucket {call.bucket} does not exist")
            self._check_signature(call.inputs, buckets[call.bucket])
        return self._serving(lambda: self.ranks.run(call, self.config.call_timeout_s))

    # -- generation (cluster.generation_service) ---------------------------------------------
    def endpoint(self) -> Any:
        return self.generation.endpoint()

    def generate_open(self, request: Any, draft: Any = None) -> int:
        return self.generation.generate_open(request, draft)

    def generate_step(self, session_id: int) -> Any:
        return self.generation.generate_step(session_id)

    def generate_close(self, session_id: int) -> Any:
        return self.generation.generate_close(session_id)

    def generate_batch(self, opens: Sequence[tuple[Any, Any]] = (), closes: Sequence[int] = (),
                       sessions: Sequence[int] = (), resync: bool = False) -> GenerationRound:
        return self.generation.generate_batch(opens, closes, sessions, resync)

    def generate_rounds(self, stream: Any, opens: Sequence[tuple[Any, Any, Any]] = (), closes: Sequence[int] = (),
                        sessions: Sequence[int] = (), resync: bool = False) -> Iterator[GenerationRound]:
        return self.generation.generate_rounds(stream, opens, closes, sessions, resync)

    def generate_admit(self, stream: Any, opens: Sequence[tuple[Any, Any, Any]] = (), closes: Sequence[int] = ()) -> None:
        self.generation.generate_admit(stream, opens, closes)

    @staticmethod
    def _check_signature(inputs: tuple[torch.Tensor, ...], expected: Signature) -> None:
        got = signature_of(inputs)
        if got != expected:
            raise InputError(
                f"inputs {describe_signature(got)} do not match the traced signature {describe_signature(expected)}: "
                "pad or truncate to the traced shapes, or trace with a bucket_config"
            )

    def export(self) -> Exported:
        if self.state is None:
            raise ClusterError("nothing to save: the coordinator holds no model")
        return Exported(self.state, self.ranks.export(self.config.trace_timeout_s))

    def save(self, path: str) -> None:
        """Save the model into the folder `path`, each rank writing its own files (its weights never
        travel: the folder must be reachable at `path` from every rank's node); then the manifest."""
        if self.state is None:
            raise ClusterError("nothing to save: the coordinator holds no model")
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        plan, written = self.ranks.save(str(folder.resolve()), self.config.trace_timeout_s)
        files = {name: entry for rank in written for name, entry in rank.items()}
        inline = self.state.inline_weights
        ranks = [{"graphs": graphs, "weights": None if inline else f"weights/rank_{r:02d}.safetensors"}
                 for r, graphs in enumerate(plan.graphs)]
        shared = "weights/shared.safetensors" if plan.shared and not inline else None
        artifact.write_manifest(folder, self.state, ranks, shared, files)

    def model_state(self) -> ModelState:
        if self.state is None:
            raise ClusterError("the coordinator holds no model; trace or load one first")
        return self.state

    def weight_specs(self) -> list[dict[str, Any]]:
        return self.ranks.weight_specs(self.config.call_timeout_s)

    def replace_weights(self, states: Sequence[dict[str, torch.Tensor]]) -> None:
        self.ranks.replace_weights(states, self.config.call_timeout_s)

    def info(self) -> CoordinatorInfo:
        state = self.state
        if state is None:
            return CoordinatorInfo(tp_degree=self.ranks.world_size, pid=os.getpid(), broken=self._broken,
                                   rebuilds=self.rebuilds)
        return CoordinatorInfo(
            tp_degree=self.ranks.world_size, backend=state.backend,
            buckets=[[s.to_json() for s in sig] for sig in state.buckets], inline_weights=state.inline_weights,
            trace_mode=list(state.trace_mode), extra=dict(state.extra), pid=os.getpid(), broken=self._broken,
            rebuilds=self.rebuilds,
        )

    def rank_timings(self, reset: bool = False) -> list[dict[str, float]]:
        """Per rank: graph calls since the last reset, seconds in them and in their collectives."""
        return self.ranks.timings(reset, self.config.health_timeout_s)

    def describe_ranks(self) -> list[dict[str, Any]]:
        return self._serving(lambda: self.ranks.describe(self.config.call_timeout_s))

    def health(self) -> list[int]:
        """Every rank answers, or ModelUnavailable (a rank lost now starts the rebuild)."""
        return self._serving(lambda: self.ranks.ping(self.config.health_timeout_s))

    def close(self) -> None:
        self.ranks.close()


__all__ = ["Coordinator", "CoordinatorConfig"]
