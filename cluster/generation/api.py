"""generate() and stream_generate(): the driver side of a generation on a traced decoder.

`generate(target, input_ids, draft_model=draft)` is the guide's
`generate_on_neuron(prompt, target_model, draft_model=draft_model)`. The loop itself runs in the
target's coordinator, which streams each step's tokens here as it makes them
(`cluster.generation.rounds`): no call per token. A consumer that stops iterating closes its
session, which stops the generation on the ranks at the next step.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from cluster.errors import InputError
from cluster.generation.defaults import DEFAULTS
from cluster.generation.types import GenerationRequest, SamplingParams
from cluster.generation.stats import GenerationStats


@dataclass
class GenerationOutput:
    sequences: list[list[int]]  # generated tokens per row (prompt excluded)
    finish_reasons: list[str]
    stats: GenerationStats = field(default_factory=GenerationStats)


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
    """Iterate for each step's new tokens per row; `.output` holds the result once iteration ends.

    Stop sequences are matched by the engine: a row whose generated tokens end with one finishes
    with reason "stop", and the stop sequence is left out of `.output`. Its tokens are left out of
    the step that completes it too, but those of them that an earlier step yielded (a stop sequence
    that spans steps) were yielded.
    """

    def __init__(self, model: Any, prompts: list[list[int]], request: GenerationRequest, draft_model: Any) -> None:
        self._coordinator = model._coordinator
        # a str names the draft fused into the target (cluster.trace.fuse_draft); else a loaded draft model
        self._draft = draft_model if draft_model is None or isinstance(draft_model, str) else draft_model.coordinator
        self._request = request
        self._prompts = prompts
        self.output: GenerationOutput | None = None

    def __iter__(self) -> Iterator[list[list[int]]]:
        started = time.perf_counter()
        rows = len(self._prompts)
        yielded: list[list[int]] = [[] for _ in range(rows)]
        first_token_s = None
        session, summary = None, None
        rounds = self._coordinator.generate_rounds(f"library-{uuid.uuid4().hex}", [(0, self._request, self._draft)])
        try:
            for round_ in rounds:
                if session is None:
                    if isinstance(round_.opened[0], BaseException):
                        raise round_.opened[0]
                    session = round_.opened[0]
                step = round_.steps.get(session)
                if step is not None and (any(step.tokens) or step.done):
                    first_token_s = first_token_s or time.perf_counter() - started
                    for row, tokens in enumerate(step.tokens):
                        yielded[row] += tokens
                    yield [list(tokens) for tokens in step.tokens]
                summary = round_.summaries.get(session)
                if summary is not None:
                    break
        finally:
            if summary is None and session is not None:  # the consumer stopped early, or the replica lost it
                summary = self._coordinator.generate_close(session)
            total = time.perf_counter() - started
            if summary is None:  # the replica lost the session (it was rebuilt): what was yielded
                generated, reasons, speculation = yielded, [""] * rows, None
            else:
                generated, reasons, speculation = summary.generated, summary.finish, summary.speculation
            reasons = [reason or "cancelled" for reason in reasons]
            stats = GenerationStats.measure(
                prompt_tokens=sum(map(len, self._prompts)), generated_tokens=sum(map(len, generated)),
                finish_reasons=reasons, speculation=speculation if self._draft is not None else None,
                first_token_s=first_token_s, total_s=total)
            self.output = GenerationOutput(generated, reasons, stats)


def stream_generate(model: Any, input_ids: Any, max_new_tokens: int | None = None, *, attention_mask: Any = None,
                    temperature: float = DEFAULTS.temperature, top_k: int = DEFAULTS.top_k,
                    top_p: float = DEFAULTS.top_p, seed: int | None = None, eos_token_id: int | None = None,
                    stop_sequences: Sequence[Sequence[int]] = (), draft_model: Any = None,
                    speculation_length: int | None = None) -> GenerationStream:
    """A stream of new tokens per row, step by step (see GenerationStream).

    max_new_tokens and speculation_length default (None) to cluster.generation.defaults.DEFAULTS.
    """
    prompts = _prompts(input_ids, attention_mask)
    request = GenerationRequest(
        tuple(map(tuple, prompts)),
        DEFAULTS.max_new_tokens if max_new_tokens is None else max_new_tokens,
        SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
        eos_token_id,
        DEFAULTS.speculation_length if speculation_length is None else speculation_length,
        tuple(tuple(map(int, stop)) for stop in stop_sequences if len(stop)),
    )
    return GenerationStream(model, prompts, request, draft_model)


def generate(model: Any, input_ids: Any, max_new_tokens: int | None = None, **kwargs: Any) -> GenerationOutput:
    """Generate up to max_new_tokens (default DEFAULTS.max_new_tokens, 64) for every prompt (greedy by
    default; temperature/top_k/top_p/seed to sample; eos_token_id and stop_sequences to stop early;
    draft_model for speculative decoding)."""
    stream = stream_generate(model, input_ids, max_new_tokens, **kwargs)
    for _ in stream:
        pass
    return stream.output
