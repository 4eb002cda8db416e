"""The bucket layout of a decoder model, and the input tensors of each kind of step. Pure functions.

A decoder is traced with up to four kinds of graph, all following the decode contract of
cluster.models.llama: `prefill` (n = prompt bucket, attends to its own span), `decode` (n = 1,
bucketed on cache length, so a short conversation attends over a short span), `verify` (n =
verify_tokens = k_max + 1 for speculative decoding, bucketed on cache length) and `extend` (n =
chunk_tokens new tokens of a row attending to its cache, bucketed on cache length: a long prompt
prefilled a chunk per round). Each kind exists for every batch bucket. The last cache position is a
scratch slot: padding tokens are written there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.errors import InputError


@dataclass(frozen=True)
class DecoderLayout:
    batch_buckets: tuple[int, ...] = (1, 4)
    prompt_buckets: tuple[int, ...] = (32, 128)
    cache_buckets: tuple[int, ...] = (128, 512)
    verify_tokens: int = 0  # 0: no verify graphs (a model used only as a draft or target-only)
    # 0: no extend graphs, a prompt must fit the largest prompt bucket; else a prompt longer than this
    # is prefilled this many tokens per round (chunked prefill), up to what the cache holds
    chunk_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_buckets", "prompt_buckets", "cache_buckets"):
            values = getattr(self, name)
            if not values or list(values) != sorted(set(values)) or values[0] < 1:
                raise ValueError(f"DecoderLayout.{name} must be increasing positive sizes, got {values}")
        if max(self.prompt_buckets) > max(self.cache_buckets):
            raise ValueError("the largest prompt bucket must fit in the cache")
        if not 0 <= self.chunk_tokens < max(self.cache_buckets):
            raise ValueError(f"DecoderLayout.chunk_tokens must be 0 (none) or below the largest cache bucket, got {self.chunk_tokens}")

    @property
    def max_batch(self) -> int:
        return max(self.batch_buckets)

    @property
    def max_cache(self) -> int:
        return max(self.cache_buckets)

    def batch_bucket(self, rows: int) -> int:
        """The smallest batch bucket that holds `rows` rows (the largest when none does)."""
        return next((b for b in self.batch_buckets if b >= rows), self.max_batch)

    @property
    def scratch(self) -> int:
        return self.max_cache - 1

    @property
    def max_prompt(self) -> int:
        """The longest prompt the model takes: the largest prompt bucket, or with chunked prefill all
        but the scratch slot and the first generated token's place."""
        return self.scratch - 1 if self.chunk_tokens else max(self.prompt_buckets)

    def chunked(self, tokens: int) -> bool:
        """Whether a prompt of this many tokens is prefilled in chunks."""
        return bool(self.chunk_tokens) and tokens > min(self.chunk_tokens, max(self.prompt_buckets))

    def kinds(self) -> list[tuple[str, int, int]]:
        """(kind, batch, size) for every graph, in bucket order; size is the prompt bucket for prefill,
        the cache span for decode and verify."""
        out = []
        for b in self.batch_buckets:
            out += [("prefill", b, p) for p in self.prompt_buckets]
            out += [("decode", b, span) for span in self.cache_buckets]
            if self.verify_tokens:
                out += [("verify", b, span) for span in self.cache_buckets]
            if self.chunk_tokens:
                out += [("extend", b, span) for span in self.cache_buckets]
        return out

    def index(self, kind: str, batch: int, size: int) -> tuple[int, int, int]:
        """(bucket index, batch bucket, size bucket): the smallest graph of `kind` that holds batch x size."""
        sizes = self.prompt_buckets if kind == "prefill" else self.cache_buckets
        b = next((x for x in self.batch_buckets if x >= batch), None)
        s = next((x for x in sizes if x >= size), None)
        if b is None:
            raise InputError(f"batch of {batch} is above the largest batch bucket {self.max_batch}; split the batch")
        if s is None:
            what = "prompt" if kind == "prefill" else "sequence"
            raise InputError(f"{what} of {size} tokens is above the largest {kind} bucket {sizes[-1]}; shorten it")
        return self.kinds().index((kind, b, s)), b, s

    def examples(self) -> list[tuple[torch.Tensor, ...]]:
        """One example input tuple per bucket (what parallel_model_trace takes), in bucket order."""
        out = []
        for kind, b, size in self.kinds():
            n = {"prefill": size, "decode": 1, "verify": self.verify_tokens, "extend": self.chunk_tokens}[kind]
            logit_index = torch.arange(n).repeat(b, 1) if kind == "verify" else torch.zeros(b, 1, dtype=torch.long)
            out.append((torch.zeros(b, n, dtype=torch.long), torch.arange(n).repeat(b, 1),
                        torch.ones(b, size, dtype=torch.long), logit_index))
        return out

    def to_json(self) -> dict:
        return {"batch_buckets": list(self.batch_buckets), "prompt_buckets": list(self.prompt_buckets),
                "cache_buckets": list(self.cache_buckets), "verify_tokens": self.verify_tokens,
                "chunk_tokens": self.chunk_tokens}

    @classmethod
    def from_json(cls, data: dict) -> "DecoderLayout":
        return cls(tuple(data["batch_buckets"]), tuple(data["prompt_buckets"]), tuple(data["cache_buckets"]),
                   int(data.get("verify_tokens", 0)), int(data.get("chunk_tokens", 0)))


def prefill_inputs(layout: DecoderLayout, prompts: list[list[int] | None]) -> tuple[int, tuple[torch.Tensor, ...]]:
    """Right-padded prompts: (bucket, (ids, positions, cache_mask, logit_index at each last token)).

    A None row is a cache slot that is not being prefilled (it holds another sequence): its tokens
    go to the scratch slot, so its cache row is left as it was.
    """
    given = [p for p in prompts if p is not None]
    if not given or any(len(p) == 0 for p in given):
        raise InputError("every prompt needs at least one token")
    longest = max(len(p) for p in given)
    bucket, b, size = layout.index("prefill", len(prompts), longest)
    ids = torch.zeros(b, size, dtype=torch.long)
    positions = torch.arange(size).repeat(b, 1)
    mask = torch.zeros(b, size, dtype=torch.long)
    last = torch.zeros(b, 1, dtype=torch.long)
    mask[:, 0] = 1  # padding rows attend to something: no NaN anywhere
    for row, prompt in enumerate(prompts):
        if prompt is None:
            positions[row] = layout.scratch
            continue
        ids[row, : len(prompt)] = torch.tensor(prompt)
        mask[row, : len(prompt)] = 1
        last[row, 0] = len(prompt) - 1
    positions[len(prompts):] = layout.scratch  # rows of the batch bucket beyond the slots in use
    return bucket, (ids, positions, mask, last)


def step_inputs(layout: DecoderLayout, kind: str, tokens: list[list[int]], starts: list[int]) -> tuple[int, tuple[torch.Tensor, ...]]:
    """Feed tokens[row] (-1: nothing, padding) at positions starts[row]...; returns (bucket, inputs).

    Padding tokens go to the scratch slot and are never attended to. A decode or verify step gives
    logits at every fed position; an `extend` step (a prompt's chunk) at each row's last fed token.
    """
    n = {"decode": 1, "verify": layout.verify_tokens, "extend": layout.chunk_tokens}[kind]
    if any(len(t) > n for t in tokens):
        raise InputError(f"{kind} steps take at most {n} tokens per row")
    need = max(s + sum(1 for t in row if t >= 0) for s, row in zip(starts, tokens))
    if need > layout.scratch:
        raise InputError(f"the sequence would reach {need} tokens; the cache holds {layout.scratch}: lower max_new_tokens")
    bucket, b, span = layout.index(kind, len(tokens), need)
    ids = torch.zeros(b, n, dtype=torch.long)
    pos = torch.full((b, n), layout.scratch, dtype=torch.long)
    mask = torch.zeros(b, span, dtype=torch.long)
    mask[:, 0] = 1
    for row, (row_tokens, start) in enumerate(zip(tokens, starts)):
        at = start
        for i, token in enumerate(row_tokens):
            if token >= 0:
                ids[row, i] = token
                pos[row, i] = at
                at += 1
        mask[row, :at] = 1
    if kind == "extend":
        last = [max(0, sum(1 for t in row if t >= 0) - 1) for row in tokens] + [0] * (b - len(tokens))
        return bucket, (ids, pos, mask, torch.tensor(last, dtype=torch.long)[:, None])
    return bucket, (ids, pos, mask, torch.arange(n).repeat(b, 1))
