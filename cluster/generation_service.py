"""Generation serving for one replica: its decode batch and the generate_* calls it answers.

The batch (cluster.generation.engine.DecodeBatch) holds the sequences in the model's KV-cache
slots and runs the target/draft loop; this module builds the endpoints it calls (the model's own,
a draft model's, a draft fused into the model, n-gram proposals) and answers open, step, close and
the scheduling rounds a server runs (cluster.generation.rounds).

It knows the replica only through four callables (`cluster.coordinator.Coordinator` passes its
own): `run(call)`, one call to the replica's ranks (a cluster.generation.plan call type);
`extra()`, the loaded model's metadata (`ModelState.extra`, {} before one is loaded);
`serving(fn)`, which runs `fn` so that a lost rank breaks the replica and starts its rebuild
(cluster.recovery), around each step of the batch; `check()`, which raises ModelUnavailable while
the replica is broken.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

from cluster.errors import ClusterError, InputError
from cluster.generation.endpoint import DecoderEndpoint
from cluster.generation.engine import DecodeBatch
from cluster.generation.layout import DecoderLayout
from cluster.generation.ngram import NGRAM_DRAFT
from cluster.generation.plan import Call, Forward
from cluster.generation.rounds import RoundStreams
from cluster.generation.types import GenerationRound


class GenerationService:
    """The generate_* calls of one replica over its decode batch (see the module docstring).
    `streams` runs its round streams; their lock serialises every call to the replica."""

    def __init__(self, run: Callable[[Call], Any], extra: Callable[[], dict[str, Any]],
                 serving: Callable[[Callable[[], Any]], Any], check: Callable[[], None]) -> None:
        self._run = run
        self._extra = extra
        self._serving = serving
        self._check = check
        self._batch: DecodeBatch | None = None  # the decoder's sequences, made on the first request
        self.streams = RoundStreams(self.generate_batch, self.has_work)

    def has_work(self) -> bool:
        batch = self._batch
        return batch is not None and batch.has_work()

    def drop(self) -> None:
        """Forget every session: the KV caches are gone with the ranks (a lost rank)."""
        self._batch = None

    # -- endpoints --------------------------------------------------------------------------
    def endpoint(self) -> DecoderEndpoint:
        """The model's own endpoint, from its decoder description."""
        decoder = self._extra().get("decoder")
        if not decoder:
            raise InputError("this model is not a decoder traced for generation (see cluster.models.llama.trace_llama)")
        return DecoderEndpoint(self._run, DecoderLayout.from_json(decoder["layout"]), int(decoder["vocab_size"]),
                               decoder.get("name", "model"), key=f"local-{id(self)}", multi_step=True)

    def _decode_batch(self) -> DecodeBatch:
        self._check()
        if self._batch is None:
            self._batch = DecodeBatch(self.endpoint())
        return self._batch

    def _draft_endpoint(self, draft: Any) -> DecoderEndpoint:
        """The draft's endpoint: calls into another model's coordinator (a handle, remote or local)."""
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
        if info.get("tokenizer_sha") != (self._extra().get("decoder") or {}).get("tokenizer_sha"):
            raise InputError("draft and target were traced with different tokenizers: they must share one")
        return DecoderEndpoint(draft.run, DecoderLayout.from_json(info["layout"]), int(info["vocab_size"]),
                               info.get("name", "draft"), key=key)

    def _ngram_endpoint(self) -> DecoderEndpoint:
        """Proposals by n-gram lookup (cluster.generation.ngram): no draft model, the target's own calls."""
        batch = self._decode_batch()
        if batch.draft is not None and batch.draft.ngram:
            return batch.draft
        return dataclasses.replace(batch.target, name=NGRAM_DRAFT, key=f"ngram-{id(self)}", multi_step=False,
                                   ngram=True)

    def _fused_endpoint(self, name: str) -> DecoderEndpoint:
        """The draft fused into this model, asked for by its name."""
        fused = self._extra().get("fused_draft")
        if not fused or fused["name"] != name:
            held = f"its fused draft is {fused['name']!r}" if fused else "it holds no fused draft"
            raise InputError(f"draft {name!r} is not fused into this model ({held}): name a loaded draft model, "
                             "or fuse the draft into the target's folder (cluster.trace.fuse_draft)")
        batch = self._batch
        if batch is not None and batch.draft is not None and batch.draft.fused:
            return batch.draft
        return DecoderEndpoint(self._run_fused_draft, DecoderLayout.from_json(fused["layout"]),
                               int(fused["vocab_size"]), name, key=f"fused-{id(self)}", fused=True)

    def _run_fused_draft(self, call: Call) -> Any:
        """`run` on the fused draft every rank holds (its prefills)."""
        return self._run(dataclasses.replace(call, draft=True) if isinstance(call, Forward) else call)

    # -- the calls --------------------------------------------------------------------------
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


__all__ = ["GenerationService"]
