"""The generation loop: continuous batching over a decoder's KV-cache slots, with optional speculation.

A decoder's KV cache has `max_batch` rows; each row is a slot that one sequence holds from the
moment it is admitted until its session is closed. `DecodeBatch.step()` advances every live
sequence by one step: sequences admitted since the last step are prefilled together (the other
rows' tokens go to the scratch slot, so their caches are untouched), the running ones decode one
token, or, when some of them speculate, run one draft/verify round. A new request therefore joins
at the next step and a finished one leaves without waiting for the others: continuous batching.

Every sequence keeps its own sampling parameters and random generator, so what a seeded request
generates does not depend on what else shares the batch. Rows that do not speculate ride along in
the verify forward with one token. A step is one round trip per model: the draft proposes k tokens
in one `decode_loop` call on its ranks, the target verifies them in one `verify` forward. Rolling
back rejected tokens is free, because what a query may attend to is decided by the lengths kept
here, not by the cache contents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from cluster.errors import ClusterError, DraftUnavailable, InputError, Overloaded
from cluster.generation.layout import DecoderLayout, prefill_inputs, step_inputs
from cluster.generation.sampling import SamplingParams, make_generator, probabilities, sample
from cluster.generation.speculative import SpeculationStats, verify_draft


@dataclass
class DecoderEndpoint:
    """What the loop needs of one model: its layout and vocabulary, and two calls to its ranks."""

    forward_bucket: Callable[[int, tuple], Any]
    decode_loop: Callable[[dict], Any]
    layout: DecoderLayout
    vocab_size: int
    name: str = "model"
    key: str = ""  # identifies the replica (and so its KV cache) behind the calls


@dataclass(frozen=True)
class GenerationRequest:
    prompts: tuple[tuple[int, ...], ...]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    eos_token_id: int | None = None
    speculation_length: int = 4


@dataclass
class StepResult:
    tokens: list[list[int]]  # new tokens per row since the last take (empty for finished rows)
    done: bool
    finish_reasons: list[str] = field(default_factory=list)


@dataclass
class _Sequence:
    slot: int
    session: int
    sequence: list[int]  # prompt + emitted
    prompt_length: int
    request: GenerationRequest
    k: int  # draft proposals per round; 0: no speculation
    generator: torch.Generator
    cached: int = 0  # tokens of the sequence in the target's cache
    draft_cached: int = 0
    started: bool = False
    finish: str = ""
    outbox: list[int] = field(default_factory=list)
    stats: SpeculationStats = field(default_factory=SpeculationStats)

    @property
    def generated(self) -> list[int]:
        return self.sequence[self.prompt_length:]

    def emit(self, tokens: list[int]) -> None:
        for token in tokens:
            if self.finish:
                return
            self.sequence.append(int(token))
            self.outbox.append(int(token))
            if self.request.eos_token_id is not None and token == self.request.eos_token_id:
                self.finish = "eos"
            elif len(self.generated) >= self.request.max_new_tokens:
                self.finish = "length"

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from logits [V] under this sequence's own parameters and generator."""
        params = self.request.sampling
        if params.greedy:
            return int(logits.argmax())
        return int(sample(probabilities(logits[None].float(), params), self.generator)[0])

    def seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.generator))


def _validate(request: GenerationRequest, target: DecoderEndpoint, draft: DecoderEndpoint | None) -> int:
    """Check a request against the models; returns its speculation length (0 without a draft)."""
    prompts = request.prompts
    if not prompts or any(not p for p in prompts):
        raise InputError("every prompt needs at least one token; send non-empty prompts")
    if request.max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
    longest = max(map(len, prompts))
    if longest > max(target.layout.prompt_buckets):
        raise InputError(f"prompt of {longest} tokens is above the largest context bucket {max(target.layout.prompt_buckets)}; shorten it")
    if len(prompts) > target.layout.max_batch:
        raise InputError(f"{len(prompts)} prompts in one request; model {target.name!r} holds at most "
                         f"{target.layout.max_batch} sequences: split the request")
    k = request.speculation_length if draft is not None else 0
    if draft is not None:
        if draft.vocab_size != target.vocab_size:
            raise InputError(f"draft {draft.name!r} has a vocabulary of {draft.vocab_size}, target {target.name!r} "
                             f"{target.vocab_size}: draft and target must share a tokenizer and vocabulary")
        if not 1 <= k < target.layout.verify_tokens:
            raise InputError(f"speculation_length must be 1..{target.layout.verify_tokens - 1} for {target.name!r} "
                             f"(its verification bucket holds {target.layout.verify_tokens} tokens), got {k}")
    room = min(target.layout.scratch, draft.layout.scratch if draft else target.layout.scratch)
    if longest + request.max_new_tokens + k + 1 > room:
        raise InputError(f"prompt ({longest}) + max_new_tokens ({request.max_new_tokens}) does not fit the KV cache "
                         f"({room - k - 1} tokens); lower max_new_tokens")
    return k


class DecodeBatch:
    """The sequences sharing one decoder's KV cache, one slot (cache row) each.

    `open` admits a request's prompts (one sequence each) and returns a session id; `step` advances
    every live sequence; `take` hands a session the tokens generated since its last take; `close`
    frees its slots. One draft model at a time serves the batch's speculating sequences: its cache
    rows mirror the target's slots.
    """

    def __init__(self, target: DecoderEndpoint) -> None:
        self.target = target
        self.draft: DecoderEndpoint | None = None
        self.slots: dict[int, _Sequence] = {}
        self.sessions: dict[int, list[_Sequence]] = {}
        self._last_session = 0

    # -- admission --------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.target.layout.max_batch

    @property
    def free_slots(self) -> int:
        return self.capacity - len(self.slots)

    def has_work(self) -> bool:
        return any(not s.finish for s in self.slots.values())

    def open(self, request: GenerationRequest, draft: DecoderEndpoint | None = None) -> int:
        k = _validate(request, self.target, draft)
        rows = len(request.prompts)
        if draft is not None and self.draft is not None and self.draft.key != draft.key and self._speculating():
            raise Overloaded(f"{self.target.name!r} is speculating with another draft replica; retry shortly")
        limit = self.capacity if draft is None else min(self.capacity, draft.layout.max_batch)
        free = [slot for slot in range(limit) if slot not in self.slots][:rows]
        if len(free) < rows:
            raise Overloaded(f"all {self.capacity} sequence slots of {self.target.name!r} are generating; retry shortly")
        if draft is not None:
            self.draft = draft
        self._last_session += 1
        session = self._last_session
        generator = make_generator(request.sampling.seed)
        members = []
        for slot, prompt in zip(free, request.prompts):
            row_generator = make_generator(int(torch.randint(0, 2**62, (1,), generator=generator)))
            member = _Sequence(slot, session, list(prompt), len(prompt), request, k, row_generator)
            self.slots[slot] = member
            members.append(member)
        self.sessions[session] = members
        return session

    def _speculating(self) -> bool:
        return any(s.k for s in self.slots.values())

    def close(self, session: int) -> dict[str, Any]:
        """Free the session's slots; returns its sequences, finish reasons and speculation counts."""
        members = self.sessions.pop(session, None)
        if members is None:
            return {}
        stats = SpeculationStats()
        for member in members:
            del self.slots[member.slot]
            stats = stats.merge(member.stats)
        if not self._speculating():
            self.draft = None
        return {"sequences": [m.sequence for m in members], "prompt_lengths": [m.prompt_length for m in members],
                "finish": [m.finish for m in members], "speculation": stats.as_dict()}

    def take(self, session: int) -> StepResult:
        members = self.sessions.get(session)
        if members is None:
            raise ClusterError(f"generation {session} is not open on this model (closed, or the replica was rebuilt)")
        tokens = []
        for member in members:
            tokens.append(member.outbox)
            member.outbox = []
        return StepResult(tokens, all(m.finish for m in members), [m.finish for m in members])

    def has_output(self, session: int) -> bool:
        return any(m.outbox for m in self.sessions.get(session, ()))

    def finished(self, session: int) -> bool:
        return all(m.finish for m in self.sessions.get(session, ()))

    # -- steps ------------------------------------------------------------------------------
    def step(self) -> None:
        """Advance every live sequence by one step; new tokens go to each sequence's outbox."""
        live = [s for s in self.slots.values() if not s.finish]
        running = [s for s in live if s.started]
        if any(s.k for s in running):
            self._speculate(running)
        elif running:
            self._decode(running)
        new = [s for s in live if not s.started]
        if new:
            self._prefill(new)

    @staticmethod
    def _width(members: list[_Sequence]) -> int:
        return max(m.slot for m in members) + 1

    def _prefill(self, new: list[_Sequence]) -> None:
        prompts: list[list[int] | None] = [None] * self._width(new)
        for member in new:
            prompts[member.slot] = member.sequence
        bucket, inputs = prefill_inputs(self.target.layout, prompts)
        logits = self.target.forward_bucket(bucket, inputs)[0][:, 0].float()
        drafted = [m for m in new if m.k]
        if drafted:
            draft_prompts: list[list[int] | None] = [None] * self._width(drafted)
            for member in drafted:
                draft_prompts[member.slot] = member.sequence
            self._on_draft(self.draft.forward_bucket, *prefill_inputs(self.draft.layout, draft_prompts))
        for member in new:
            member.started = True
            member.cached = member.draft_cached = member.prompt_length
            member.emit([member.pick(logits[member.slot])])

    def _decode(self, running: list[_Sequence]) -> None:
        width = self._width(running)
        tokens, starts = [[-1] for _ in range(width)], [0] * width
        for member in running:
            tokens[member.slot], starts[member.slot] = member.sequence[member.cached:], member.cached
        bucket, inputs = step_inputs(self.target.layout, "decode", tokens, starts)
        logits = self.target.forward_bucket(bucket, inputs)[0][:, 0].float()
        for member in running:
            member.cached += 1
            member.emit([member.pick(logits[member.slot])])

    def _speculate(self, running: list[_Sequence]) -> None:
        drafted = [m for m in running if m.k]
        k_max = max(m.k for m in drafted)
        proposals, q, pending = self._propose(drafted, k_max)
        n = self.target.layout.verify_tokens
        width = self._width(running)
        rows, starts = [[-1] * n for _ in range(width)], [0] * width
        for m in running:
            fed = [m.sequence[m.cached], *(proposals[m.slot, : m.k].tolist() if m.k else [])]
            rows[m.slot], starts[m.slot] = fed + [-1] * (n - len(fed)), m.cached
        bucket, inputs = step_inputs(self.target.layout, "verify", rows, starts)
        logits = self.target.forward_bucket(bucket, inputs)[0][:, :n].float()
        for m in running:
            if not m.k:  # rides along with one token
                m.cached += 1
                m.emit([m.pick(logits[m.slot, 0])])
                continue
            params = m.request.sampling
            proposed = proposals[m.slot : m.slot + 1, : m.k]
            p = probabilities(logits[m.slot : m.slot + 1, : m.k + 1], params)
            if params.greedy or q is None:  # greedy verification looks at the target only
                q_row = torch.nn.functional.one_hot(proposed, p.shape[-1]).float()
            else:
                q_row = q[m.slot : m.slot + 1, : m.k]
            out, accepted = verify_draft(proposed, q_row, p, m.generator, params.greedy)
            a = int(accepted[0])
            m.stats.add(m.k, a)
            # the draft fed its pending tokens, then its first k_max - 1 proposals
            m.draft_cached += sum(1 for t in pending[m.slot] if t >= 0) + min(a, k_max - 1)
            m.cached += 1 + a
            m.emit(out[0, : a + 1].tolist())

    def _on_draft(self, call: Callable[..., Any], *args: Any) -> Any:
        """A call to the draft's ranks; its failure is the draft's, not this (target) model's."""
        try:
            return call(*args)
        except (InputError, Overloaded):
            raise
        except ClusterError as exc:
            raise DraftUnavailable(f"draft model {self.draft.name!r} failed: {str(exc).splitlines()[0]}; "
                                   "retry, or generate without a draft") from None

    def _propose(self, drafted: list[_Sequence], k_max: int) -> tuple[torch.Tensor, torch.Tensor | None, list[list[int]]]:
        """k_max draft tokens per speculating row, in one call to the draft's ranks."""
        width = self._width(drafted)
        pending: list[list[int]] = [[-1] for _ in range(width)]
        starts, sampling, seeds = [0] * width, [SamplingParams()] * width, [0] * width
        for m in drafted:
            pending[m.slot], starts[m.slot] = m.sequence[m.draft_cached:], m.draft_cached
            sampling[m.slot], seeds[m.slot] = m.request.sampling, m.seed()
        longest = max(map(len, pending))
        pending = [[-1] * (longest - len(p)) + p for p in pending]  # right-aligned
        proposals, q = self._on_draft(self.draft.decode_loop, {
            "pending": pending, "starts": starts, "steps": k_max, "layout": self.draft.layout,
            "sampling": sampling, "seeds": seeds, "want_probs": any(not m.request.sampling.greedy for m in drafted),
        })
        return proposals, q, pending
