"""One generating sequence as the loop keeps it (`LiveSequence`), and the checks a request passes first.

A sequence holds one KV-cache slot of its model from admission until its session closes. It
keeps its tokens (prompt + generated), how many of them each model has cached, its speculation
length and acceptance record, its own sampling parameters and this round's random generator
(`new_round`: from its seed and length, so a sequence carried on elsewhere continues the same
random stream), and the tokens not yet taken by its session (`outbox`). `emit` applies the stop
rules (stop sequences, eos, max_new_tokens) as tokens arrive. `validate` refuses what a model
cannot run before anything is admitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from cluster.errors import InputError
from cluster.generation.ngram import NgramIndex
from cluster.generation.plan import RowState
from cluster.generation.sampling import position_generator, probabilities, sample
from cluster.generation.speculative import SpeculationStats
from cluster.generation.types import GenerationRequest

if TYPE_CHECKING:
    from cluster.generation.endpoint import DecoderEndpoint
    from cluster.generation.layout import DecoderLayout


def stop_matched(sequence: Sequence[int], start: int, stops: Sequence[Sequence[int]]) -> int:
    """The length of the first of `stops` that sequence[start:] ends with; 0 when none does."""
    for stop in stops:
        n = len(stop)
        if len(sequence) - start >= n and tuple(sequence[len(sequence) - n:]) == tuple(stop):
            return n
    return 0



@dataclass
class LiveSequence:
    slot: int
    session: int
    sequence: list[int]  # prompt + emitted
    prompt_length: int
    request: GenerationRequest
    k: int  # draft proposals per round (adaptive: the most a round may ask); 0: no speculation
    seed: int  # with the sequence's length, what seeds each round's generator
    adaptive: bool = False  # each round picks its k, up to `k`
    round_k: int = 0  # this round's proposals
    trials: int = 0  # accepted proposals plus each round's first rejection: the acceptance estimate's base
    cached: int = 0  # tokens of the sequence in the target's cache
    reused: int = 0  # of them, taken from a kept row at admission (prefix reuse), not prefilled
    draft_cached: int = 0
    started: bool = False
    draft_lost: bool = False  # it speculated until its draft failed: target-only since
    finish: str = ""
    outbox: list[int] = field(default_factory=list)
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    generator: torch.Generator | None = None  # this round's (`new_round`)
    ngrams: NgramIndex | None = None  # proposals without a draft model (`NGRAM_DRAFT`)

    def new_round(self) -> None:
        """Draw this round's generator from the seed and the sequence's length."""
        self.generator = position_generator(self.seed, len(self.sequence))

    def prefill_tokens(self) -> list[int]:
        """What its prefill feeds: its prompt, or for a resumed row all but its last token, which the
        next round feeds, as it would have."""
        return self.sequence[:-1] if self.request.resumed else self.sequence

    def state(self, catch_up: bool = False, layout: DecoderLayout | None = None) -> RowState:
        """What the round's plan reads of the sequence; `catch_up`: its draft cache is refilled first;
        with `layout`, whether its prefill is chunked."""
        # a new row that pins k has its draft prefilled with the target; an adaptive one when a round
        # first has it speculate (`plan_round`'s catch-up): a busy batch may never ask it to
        k = self.round_k if self.started else (0 if self.adaptive else self.k)
        tokens = self.sequence if self.started else self.prefill_tokens()
        # a row holding part of its prompt already (a reused prefix) prefills the rest through extend graphs
        chunked = not self.started and layout is not None and (self.cached > 0 or layout.chunked(len(tokens)))
        return RowState(self.slot, tuple(tokens), k, self.started, bool(self.finish), self.cached, self.draft_cached,
                        catch_up and bool(k), chunked)

    def advance(self, tokens: list[int], target: int, draft: int = 0) -> None:
        """Take one round's result: `target` / `draft` more of the sequence's tokens are now in each
        model's cache, and `tokens` follow it."""
        self.started = True
        self.cached += target
        self.draft_cached += draft
        self.emit(tokens)

    def emit(self, tokens: list[int]) -> None:
        """Append tokens up to the first that finishes the sequence.

        A completed stop sequence is taken back out of the sequence and of the outbox; those of its
        tokens that an earlier `take` already handed out stay handed out (the caller saw them).
        """
        for token in map(int, tokens):
            if self.finish:
                return
            self.sequence.append(token)
            self.outbox.append(token)
            stop = stop_matched(self.sequence, self.prompt_length, self.request.stop_sequences)
            if stop:
                del self.sequence[-stop:]
                del self.outbox[max(0, len(self.outbox) - stop):]
                self.finish = "stop"
            elif token == self.request.eos_token_id:
                self.finish = "eos"
            elif len(self.sequence) - self.prompt_length >= self.request.max_new_tokens:
                self.finish = "length"

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from logits [V] under this sequence's own parameters and generator."""
        params = self.request.sampling
        if params.greedy:
            return int(logits.argmax())
        return int(sample(probabilities(logits[None].float(), params), self.generator)[0])

    def draft_seed(self) -> int:
        """A seed for the draft's sampling this round, from this round's generator."""
        return int(torch.randint(0, 2**62, (1,), generator=self.generator))


def validate(request: GenerationRequest, target: DecoderEndpoint, draft: DecoderEndpoint | None) -> tuple[int, bool]:
    """Check a request against the models; returns (its speculation length, 0 without a draft; whether
    rounds pick it, up to that length)."""
    prompts = request.prompts
    if not prompts or any(not p for p in prompts):
        raise InputError("every prompt needs at least one token; send non-empty prompts")
    if request.max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
    if not 0 <= request.resumed < min(map(len, prompts)) or request.resumed >= request.max_new_tokens:
        raise InputError(f"resumed={request.resumed}: the generated tokens a prompt ends with must leave a prompt "
                         "token and fewer than max_new_tokens")
    if any(not stop or any(not isinstance(t, int) or t < 0 for t in stop) for stop in request.stop_sequences):
        raise InputError("stop sequences must be non-empty sequences of token ids")
    longest = max(map(len, prompts))
    if longest > target.layout.max_prompt:
        where = (f"the {target.layout.max_prompt} tokens its cache holds" if target.layout.chunk_tokens
                 else f"the largest context bucket {target.layout.max_prompt}")
        raise InputError(f"prompt of {longest} tokens is above {where}; shorten it")
    if len(prompts) > target.layout.max_batch:
        raise InputError(f"{len(prompts)} prompts in one request; model {target.name!r} holds at most "
                         f"{target.layout.max_batch} sequences: split the request")
    k = request.speculation_length if draft is not None else 0
    adaptive = draft is not None and k == 0
    if draft is not None:
        if draft.vocab_size != target.vocab_size:
            raise InputError(f"draft {draft.name!r} has a vocabulary of {draft.vocab_size}, target {target.name!r} "
                             f"{target.vocab_size}: draft and target must share a tokenizer and vocabulary")
        if target.layout.verify_tokens < 2:
            raise InputError(f"{target.name!r} was traced without verification graphs (verify_tokens): it cannot be "
                             "a speculation target; generate without a draft, or retrace it with verify_tokens")
        if adaptive:
            k = target.layout.verify_tokens - 1
        if not 1 <= k < target.layout.verify_tokens:
            raise InputError(f"speculation_length must be 1..{target.layout.verify_tokens - 1} (or 0: adaptive) for "
                             f"{target.name!r} (its verification bucket holds {target.layout.verify_tokens} tokens), got {k}")
    room = min(target.layout.scratch, draft.layout.scratch if draft else target.layout.scratch)
    if longest + request.max_new_tokens - request.resumed + k + 1 > room:
        raise InputError(f"prompt ({longest}) + max_new_tokens ({request.max_new_tokens}) does not fit the KV cache "
                         f"({room - k - 1} tokens); lower max_new_tokens")
    return k, adaptive


__all__ = ["LiveSequence", "stop_matched", "validate"]
