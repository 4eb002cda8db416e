"""The coordinator: forms a TP group, traces or loads its shards, picks buckets, serves calls.

A plain class over a RankGroup, so it runs in-process in tests; `actors.coordinator_actor`
hosts it in a Ray actor for the cluster. Only inputs and rank 0's outputs pass through it.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from cluster.backoff import Backoff
from cluster.buckets import run_kernel
from cluster.errors import ClusterError, InputError, ModelUnavailable
from cluster.generation.ngram import NGRAM_DRAFT
from cluster.generation.plan import Call, Forward
from cluster.generation.rounds import RoundStreams
from cluster.generation.types import GenerationRound
from cluster.handle import AsyncOverThreads, CoordinatorInfo
from cluster.rank_group import RankGroup
from cluster.recovery import Recovery
from cluster.signature import Signature, as_input_tuple, describe_signature, signature_of
from cluster.trace import artifact
from cluster.trace.backends import get_backend
from cluster.trace.config import TraceSpec
from cluster.trace.state import Exported, ModelState


RANK_CALLS = ("auto", "graph", "actor")


@dataclass(frozen=True)
class CoordinatorConfig:
    """Every bound on a replica's waits, in one place (the gateway and batch jobs read them too)."""

    call_timeout_s: float = 120.0  # one serving call on the ranks (a forward, a generation step)
    trace_timeout_s: float = 1800.0  # build, trace, load, export (Neuron compilation takes minutes)
    rendezvous_timeout_s: float = 60.0  # forming the collective group, and every collective
    health_timeout_s: float = 10.0  # a health check or status call on the ranks
    placement_timeout_s: float = 30.0  # NeuronCores for the ranks: else CapacityError, never a pending actor
    close_timeout_s: float = 10.0  # a coordinator's orderly close, before it is killed
    threads_per_rank: int = 0  # 0: this node's CPUs divided among the ranks
    # How the per-step calls reach the ranks (actors.rank_group): "graph" (a Ray Compiled Graph),
    # "actor" (ordinary actor calls), "auto" (actor calls on the cpu backend, the graph otherwise).
    rank_calls: str = "auto"
    # Hot spare rank processes per replica, started beside its ranks, each holding a NeuronCore of its
    # own: a rank lost takes a spare's process, already started, instead of starting one (the spare is
    # then replaced in the background). Used where the backend keeps the surviving ranks (cpu, eager).
    spare_ranks: int = 0
    verify_tolerance: float = 1e-4
    rebuild_backoff: Backoff = Backoff()  # between attempts to rebuild a lost replica

    def __post_init__(self) -> None:
        for name in ("call_timeout_s", "trace_timeout_s", "rendezvous_timeout_s", "health_timeout_s",
                     "placement_timeout_s", "close_timeout_s", "verify_tolerance"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CoordinatorConfig.{name} must be positive")
        if self.spare_ranks < 0:
            raise ValueError(f"CoordinatorConfig.spare_ranks must be 0 or more, got {self.spare_ranks}")
        if self.rank_calls not in RANK_CALLS:
            raise ValueError(f"CoordinatorConfig.rank_calls must be one of {RANK_CALLS}, got {self.rank_calls!r}")


class Coordinator(Recovery):
    """Drives one TP group. With `rank_group_factory`, a replica that loses a rank rebuilds itself
    (cluster.recovery): new rank actors, a new rendezvous, the shards reloaded from what it was
    loaded with."""

    def __init__(self, ranks: RankGroup, config: CoordinatorConfig | None = None,
                 rank_group_factory: Callable[[], RankGroup] | None = None) -> None:
        self.ranks = ranks
        self.config = config or CoordinatorConfig()
        self.state: ModelState | None = None
        self._kernel = None
        self._spec: TraceSpec | None = None
        self._started = False
        self._factory = rank_group_factory
        # (graphs, weights, draft) the ranks were loaded from, to load a replacement rank: a served
        # model's weights are its files (artifact.WeightFile), which the new rank maps itself, not tensors
        self._payload: tuple | None = None
        self._broken: str | None = None
        self._rebuilding: threading.Thread | None = None
        self._failing = threading.Lock()  # a serving call and the rank watch may both see a loss
        self._health = threading.Condition()  # notified on every change of `_broken` (watch_health)
        self._health_version = 0
        self._rebuild_phases: dict[str, float] = {}
        self._batch = None  # the decoder's sequences (cluster.generation.engine.DecodeBatch)
        self._draft_buckets: list[Signature] = []  # a fused draft's bucket signatures
        self.rebuilds = 0
        self.streams = RoundStreams(self.generate_batch, lambda: self._batch is not None and self._batch.has_work())
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

    def _run_fused_draft(self, call: Call) -> Any:
        """`run` on the fused draft every rank holds (its prefills)."""
        return self.run(dataclasses.replace(call, draft=True) if isinstance(call, Forward) else call)

    # -- generation (the target/draft loop runs here) ----------------------------------------
    def endpoint(self) -> Any:
        from cluster.generation.engine import DecoderEndpoint
        from cluster.generation.layout import DecoderLayout

        decoder = (self.state.extra if self.state else {}).get("decoder")
        if not decoder:
            raise InputError("this model is not a decoder traced for generation (see cluster.models.llama.trace_llama)")
        return DecoderEndpoint(self.run, DecoderLayout.from_json(decoder["layout"]), int(decoder["vocab_size"]),
                               decoder.get("name", "model"), key=f"local-{id(self)}", multi_step=True)

    def _decode_batch(self) -> Any:
        from cluster.generation.engine import DecodeBatch

        if self._broken is not None:
            raise ModelUnavailable(f"replica unavailable ({self._broken}); it is rebuilding, retry shortly")
        if self._batch is None:
            self._batch = DecodeBatch(self.endpoint())
        return self._batch

    def _draft_endpoint(self, draft: Any) -> Any:
        """The draft's endpoint: calls into another model's coordinator (a handle, remote or local)."""
        from cluster.generation.engine import DecoderEndpoint
        from cluster.generation.layout import DecoderLayout

        if draft == NGRAM_DRAFT:
            return self._ngram_endpoint()
        if isinstance(draft, str):
            return self._fused_endpoint(draft)
        key = getattr(draft, "group_name", "") or f"local-{id(draft)}"
        batch = self._batch
        if batch is not None and batch.draft is not None and batch.draft.key == key:
            return batch.draft
        info = draft.info().decoder
        if not info:
            raise InputError("the draft model is not a decoder traced for generation")
        if info.get("tokenizer_sha") != (self.state.extra.get("decoder") or {}).get("tokenizer_sha"):
            raise InputError("draft and target were traced with different tokenizers: they must share one")
        return DecoderEndpoint(draft.run, DecoderLayout.from_json(info["layout"]), int(info["vocab_size"]),
                               info.get("name", "draft"), key=key)

    def _ngram_endpoint(self) -> Any:
        """Proposals by n-gram lookup (cluster.generation.ngram): no draft model, the target's own calls."""
        target = self._decode_batch().target
        batch = self._batch
        if batch.draft is not None and batch.draft.ngram:
            return batch.draft
        return dataclasses.replace(target, name=NGRAM_DRAFT, key=f"ngram-{id(self)}", multi_step=False,
                                   ngram=True)

    def _fused_endpoint(self, name: str) -> Any:
        """The draft fused into this model, asked for by its name."""
        from cluster.generation.engine import DecoderEndpoint
        from cluster.generation.layout import DecoderLayout

        fused = (self.state.extra if self.state else {}).get("fused_draft")
        if not fused or fused["name"] != name:
            held = f"its fused draft is {fused['name']!r}" if fused else "it holds no fused draft"
            raise InputError(f"draft {name!r} is not fused into this model ({held}): name a loaded draft model, "
                             "or fuse the draft into the target's folder (cluster.trace.fuse_draft)")
        batch = self._batch
        if batch is not None and batch.draft is not None and batch.draft.fused:
            return batch.draft
        return DecoderEndpoint(self._run_fused_draft, DecoderLayout.from_json(fused["layout"]), int(fused["vocab_size"]),
                               name, key=f"fused-{id(self)}", fused=True)

    def generate_open(self, request: Any, draft: Any = None) -> int:
        """Admit a request's prompts into the model's batch (one KV-cache slot each); returns a session id.

        Sessions share decode steps: a step taken for one advances every open sequence. The
        session belongs to the caller, who closes it.
        """
        batch = self._decode_batch()
        return batch.open(request, self._draft_endpoint(draft) if draft is not None else None)

    def generate_step(self, session_id: int) -> Any:
        """The session's tokens since its last step: steps the batch when it has none waiting."""
        batch = self._decode_batch()
        if not batch.has_output(session_id) and not batch.finished(session_id):
            self._serving(batch.step)
        return batch.take(session_id)

    def generate_close(self, session_id: int) -> Any:
        """Free the session's slots; its summary (None when it was not open)."""
        return self._batch.close(session_id) if self._batch is not None else None

    def generate_batch(self, opens: Sequence[tuple[Any, Any]] = (), closes: Sequence[int] = (),
                       sessions: Sequence[int] = (), resync: bool = False) -> GenerationRound:
        """One scheduling round for a server: close sessions, admit requests, take one step.

        `sessions` are the caller's open sessions: the round returns their new tokens (and those of
        the sessions it admits). With `resync`, every other open session is closed too (a caller
        that lost track of a round, or a new gateway on an adopted replica). Sessions that finish
        in this step are closed, with summaries.
        """
        batch = self._decode_batch()
        owned = set(sessions)
        if resync:
            closes = [*closes, *(s for s in batch.sessions if s not in owned)]
        round_ = GenerationRound()
        for session in closes:
            owned.discard(session)
            summary = self.generate_close(session)
            if summary is not None:
                round_.summaries[session] = summary
        for request, draft in opens:
            try:
                session = self.generate_open(request, draft)
                owned.add(session)
                round_.opened.append(session)
            except ClusterError as exc:
                round_.opened.append(exc)
        if batch.has_work():
            self._serving(batch.step)
        for session in sorted(owned):
            if session not in batch.sessions:
                continue
            round_.steps[session] = step = batch.take(session)
            if step.done:
                round_.summaries[session] = self.generate_close(session)
        return round_

    def generate_rounds(self, stream: Any, opens: Sequence[tuple[Any, Any, Any]] = (), closes: Sequence[int] = (),
                        sessions: Sequence[int] = (), resync: bool = False) -> Iterator[GenerationRound]:
        """Rounds run back to back for the consumer `stream` (see cluster.generation.rounds):
        `opens` are (tag, request, draft); later admissions go through `generate_admit`."""
        return self.streams.rounds(stream, opens, closes, sessions, resync)

    def generate_admit(self, stream: Any, opens: Sequence[tuple[Any, Any, Any]] = (), closes: Sequence[int] = ()) -> None:
        """Admissions (tag, request, draft) and closes for `stream`'s next round."""
        self.streams.admit(stream, opens, closes)

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

    def describe_spares(self) -> list[dict[str, Any]]:
        """The hot spare rank processes (`CoordinatorConfig.spare_ranks`) that answer now: pid, node, cores."""
        spares = getattr(self.ranks, "describe_spares", None)
        return spares(self.config.health_timeout_s) if spares is not None else []

    def health(self) -> list[int]:
        """Every rank answers, or ModelUnavailable (a rank lost now starts the rebuild)."""
        return self._serving(lambda: self.ranks.ping(self.config.health_timeout_s))

    def close(self) -> None:
        self.ranks.close()


__all__ = ["Coordinator", "CoordinatorConfig"]
