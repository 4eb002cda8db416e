"""The generation loop: prefill, then target-only decoding or speculative rounds, one step per call.

It runs where the coordinator runs, over two DecoderEndpoints (the target, and optionally a draft),
each a pair of calls into a model's ranks. A step is one round trip per model: the draft proposes
k tokens in one `decode_loop` call, the target verifies them in one `verify` forward. The KV caches
stay on the ranks; rolling back rejected tokens is free, because what a query may attend to is
decided by the lengths this loop keeps, not by the cache contents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from cluster.errors import InputError
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


@dataclass(frozen=True)
class GenerationRequest:
    prompts: tuple[tuple[int, ...], ...]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    eos_token_id: int | None = None
    speculation_length: int = 4


@dataclass
class StepResult:
    tokens: list[list[int]]  # new tokens per row this step (empty for finished rows)
    done: bool
    finish_reasons: list[str] = field(default_factory=list)


class GenerationSession:
    def __init__(self, request: GenerationRequest, target: DecoderEndpoint, draft: DecoderEndpoint | None = None) -> None:
        prompts = [list(p) for p in request.prompts]
        if not prompts or any(not p for p in prompts):
            raise InputError("every prompt needs at least one token; send non-empty prompts")
        if request.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
        longest = max(map(len, prompts))
        if longest > max(target.layout.prompt_buckets):
            raise InputError(f"prompt of {longest} tokens is above the largest context bucket {max(target.layout.prompt_buckets)}; shorten it")
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
        self.request = request
        self.target, self.draft, self.k = target, draft, k
        self.rows = len(prompts)
        self.sequences = prompts  # prompt + emitted, per row
        self.prompt_lengths = [len(p) for p in prompts]
        self.cached = [0] * self.rows  # tokens of the sequence in the target's cache
        self.draft_cached = [0] * self.rows
        self.done = [False] * self.rows
        self.finish = [""] * self.rows
        self.generator = make_generator(request.sampling.seed)
        self.stats = SpeculationStats()
        self.started = False

    # -- public -----------------------------------------------------------------------------
    def step(self) -> StepResult:
        if all(self.done):
            return StepResult([[] for _ in range(self.rows)], True, self.finish)
        if not self.started:
            emitted = self._prefill()
        elif self.draft is None:
            emitted = self._decode()
        else:
            emitted = self._speculate()
        return StepResult(emitted, all(self.done), self.finish)

    def generated(self, row: int) -> list[int]:
        return self.sequences[row][self.prompt_lengths[row]:]

    # -- steps ------------------------------------------------------------------------------
    def _seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.generator))

    def _emit(self, row: int, tokens: list[int]) -> list[int]:
        out = []
        for token in tokens:
            if self.done[row]:
                break
            self.sequences[row].append(int(token))
            out.append(int(token))
            if self.request.eos_token_id is not None and token == self.request.eos_token_id:
                self.done[row], self.finish[row] = True, "eos"
            elif len(self.generated(row)) >= self.request.max_new_tokens:
                self.done[row], self.finish[row] = True, "length"
        return out

    def _prefill(self) -> list[list[int]]:
        self.started = True
        bucket, inputs = prefill_inputs(self.target.layout, self.sequences)
        logits = self.target.forward_bucket(bucket, inputs)[0][: self.rows, 0].float()
        if self.draft is not None:
            draft_bucket, draft_inputs = prefill_inputs(self.draft.layout, self.sequences)
            self.draft.forward_bucket(draft_bucket, draft_inputs)
            self.draft_cached = list(self.prompt_lengths)
        self.cached = list(self.prompt_lengths)
        first = self._pick(probabilities(logits, self.request.sampling))
        return [self._emit(row, [first[row]]) for row in range(self.rows)]

    def _pick(self, probs: torch.Tensor) -> list[int]:
        picked = probs.argmax(-1) if self.request.sampling.greedy else sample(probs, self.generator)
        return picked.tolist()

    def _decode(self) -> list[list[int]]:
        pending = [[-1] if self.done[r] else self.sequences[r][self.cached[r]:] for r in range(self.rows)]
        tokens, _ = self.target.decode_loop({
            "pending": pending, "starts": self.cached, "steps": 1, "layout": self.target.layout,
            "sampling": self.request.sampling, "seed": self._seed(), "want_probs": False,
        })
        emitted = []
        for row in range(self.rows):
            if self.done[row]:
                emitted.append([])
                continue
            self.cached[row] += 1
            emitted.append(self._emit(row, [int(tokens[row, 0])]))
        return emitted

    def _speculate(self) -> list[list[int]]:
        k, params = self.k, self.request.sampling
        live = [not d for d in self.done]
        pending = [self.sequences[r][self.draft_cached[r]:] if live[r] else [-1] for r in range(self.rows)]
        width = max(map(len, pending))
        pending = [[-1] * (width - len(p)) + p for p in pending]  # right-aligned
        proposals, q = self.draft.decode_loop({
            "pending": pending, "starts": self.draft_cached, "steps": k, "layout": self.draft.layout,
            "sampling": params, "seed": self._seed(), "want_probs": not params.greedy,
        })
        proposals = proposals[: self.rows]
        n = self.target.layout.verify_tokens
        rows = [[self.sequences[r][self.cached[r]], *proposals[r].tolist()] + [-1] * (n - k - 1) if live[r] else [-1] * n
                for r in range(self.rows)]
        bucket, inputs = step_inputs(self.target.layout, "verify", rows, self.cached)
        logits = self.target.forward_bucket(bucket, inputs)[0][: self.rows, : k + 1].float()
        p = probabilities(logits, params)
        if q is None:  # greedy: verification looks at the target only
            q = torch.nn.functional.one_hot(proposals, p.shape[-1]).float()
        else:
            q = q[: self.rows]
        out, accepted = verify_draft(proposals, q, p, self.generator, params.greedy)
        emitted = []
        for row in range(self.rows):
            if not live[row]:
                emitted.append([])
                continue
            a = int(accepted[row])
            self.stats.add(k, a)
            fed_by_draft = self.draft_cached[row] + sum(1 for t in pending[row] if t >= 0)
            self.draft_cached[row] = fed_by_draft + min(a, k - 1)
            self.cached[row] += 1 + a
            emitted.append(self._emit(row, out[row, : a + 1].tolist()))
        return emitted
