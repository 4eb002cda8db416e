"""generate() and stream_generate(): the driver side of a generation on a traced decoder.

`generate(target, input_ids, draft_model=draft)` is the guide's
`generate_on_neuron(prompt, target_model, draft_model=draft_model)`. The loop itself runs in the
target's coordinator; each step here is one call to it, so a consumer that stops iterating stops
the generation on the ranks within one step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from cluster.errors import InputError
from cluster.generation.engine import GenerationRequest
from cluster.generation.sampling import SamplingParams


@dataclass
class GenerationOutput:
    sequences: list[list[int]]  # generated tokens per row (prompt excluded)
    finish_reasons: list[str]
    stats: dict[str, Any] = field(default_factory=dict)


def _prompts(input_ids: Any, attention_mask: Any) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            return [row.tolist() for row in input_ids]
        return [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
    prompts = [list(map(int, p)) for p in input_ids]
    if not prompts:
        raise InputError("no prompts given")
    return prompts


class GenerationStream:
    """Iterate for each step's new tokens per row; `.output` holds the result once iteration ends."""

    def __init__(self, model: Any, prompts: list[list[int]], request: GenerationRequest, draft_model: Any,
                 stop_sequences: Sequence[Sequence[int]]) -> None:
        self._coordinator = model._coordinator
        self._draft = draft_model._coordinator if draft_model is not None else None
        self._request = request
        self._prompts = prompts
        self._stops = [list(s) for s in stop_sequences if len(s)]
        self.output: GenerationOutput | None = None

    def __iter__(self) -> Iterator[list[list[int]]]:
        started = time.perf_counter()
        session = self._coordinator.generate_open(self._request, self._draft)
        rows = len(self._prompts)
        generated: list[list[int]] = [[] for _ in range(rows)]
        stopped = [""] * rows
        first_token_s = None
        try:
            while True:
                result = self._coordinator.generate_step(session)
                first_token_s = first_token_s or time.perf_counter() - started
                new = []
                for row, tokens in enumerate(result.tokens):
                    kept = []
                    for token in tokens:
                        if stopped[row]:
                            break
                        generated[row].append(token)
                        kept.append(token)
                        stop = next((s for s in self._stops if generated[row][-len(s):] == s), None)
                        if stop is not None:
                            del generated[row][-len(stop):]
                            kept = kept[: max(0, len(kept) - len(stop))]
                            stopped[row] = "stop"
                    new.append(kept)
                yield new
                finished = [bool(stopped[r]) or bool(result.finish_reasons[r]) for r in range(rows)]
                if result.done or all(finished):
                    break
        finally:
            summary = self._coordinator.generate_close(session)  # also when the consumer stopped early
            total = time.perf_counter() - started
            reasons = [stopped[r] or (summary.get("finish") or [""] * rows)[r] or "cancelled" for r in range(rows)]
            count = sum(map(len, generated))
            self.output = GenerationOutput(generated, reasons, {
                "generated_tokens": count, "seconds": total, "tokens_per_second": count / total if total else 0.0,
                "time_to_first_token_s": first_token_s or 0.0, **(summary.get("speculation") or {}),
            })


def stream_generate(model: Any, input_ids: Any, max_new_tokens: int = 32, *, attention_mask: Any = None,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                    eos_token_id: int | None = None, stop_sequences: Sequence[Sequence[int]] = (),
                    draft_model: Any = None, speculation_length: int = 4) -> GenerationStream:
    """A stream of new tokens per row, step by step (see GenerationStream)."""
    prompts = _prompts(input_ids, attention_mask)
    request = GenerationRequest(tuple(map(tuple, prompts)), max_new_tokens,
                                SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
                                eos_token_id, speculation_length)
    return GenerationStream(model, prompts, request, draft_model, stop_sequences)


def generate(model: Any, input_ids: Any, max_new_tokens: int = 32, **kwargs: Any) -> GenerationOutput:
    """Generate up to max_new_tokens for every prompt (greedy by default; temperature/top_k/top_p/seed to
    sample; eos_token_id and stop_sequences to stop early; draft_model for speculative decoding)."""
    stream = stream_generate(model, input_ids, max_new_tokens, **kwargs)
    for _ in stream:
        pass
    return stream.output
