"""The generation value types: what a request asks (`GenerationRequest`, `SamplingParams`), what a
step and a closed session give back (`StepResult`, `SessionSummary`), what one coordinator round
did (`GenerationRound`).

Plain dataclasses that import no torch, so that the coordinator's handle, its round streams and the
gateway's codec read them without the generation loop (`cluster.generation.engine`) or its math.
What the loop needs of a model (`DecoderEndpoint`, typed by the round plans of
`cluster.generation.plan`) stays with the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

from cluster.errors import InputError
from cluster.generation.defaults import DEFAULTS

if TYPE_CHECKING:  # types only: this module imports no torch
    from cluster.errors import ClusterError
    from cluster.generation.speculative import SpeculationStats


MAX_TEMPERATURE = 100.0
MAX_SEED = 2**63  # exclusive: torch.Generator.manual_seed takes a signed 64-bit seed here


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from the logits.

    temperature: 0 picks the most likely token (greedy); above 0 divides the logits before softmax.
    top_k: keep only the k most likely tokens (0 keeps all).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1 keeps all).
    seed: seeds the request's generator so that it replays; None draws a fresh seed.
    """

    temperature: float = DEFAULTS.temperature
    top_k: int = DEFAULTS.top_k
    top_p: float = DEFAULTS.top_p
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or not 0.0 <= t <= MAX_TEMPERATURE:
            raise InputError(
                f"temperature={t!r} is invalid: pass a number in [0, {MAX_TEMPERATURE:g}] (0 means greedy)"
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InputError(f"top_k={self.top_k!r} is invalid: pass an integer >= 0 (0 keeps every token)")
        p = self.top_p
        if not _is_real(p) or not 0.0 < p <= 1.0:  # NaN fails the comparison too
            raise InputError(f"top_p={p!r} is invalid: pass a number in (0, 1] (1 keeps every token)")
        s = self.seed
        if s is not None and (not _is_int(s) or not 0 <= s < MAX_SEED):
            raise InputError(f"seed={s!r} is invalid: pass None or an integer in [0, 2**63)")

    @property
    def greedy(self) -> bool:
        """True when the most likely token is always taken (temperature 0)."""
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationRequest:
    """One request's prompts (one sequence each) and how to generate their continuations.

    A sequence finishes at eos_token_id (kept), at max_new_tokens, or when its generated tokens
    end with one of stop_sequences (dropped: neither kept nor handed out, see `LiveSequence.emit` in
    cluster.generation.sequence). speculation_length is the draft's proposals per round when the
    request comes with a draft; 0:
    adaptive (each round picks, up to the target's largest k). resumed: the last `resumed` tokens of
    every prompt were generated (by a replica that was lost): they count toward max_new_tokens and
    stop sequences, and sampling goes on from where they left it. streamed: its tokens go to a
    client as they are made (the gateway's Generate and OpenAI streams), so a round that runs it
    runs few decode steps in one call (`SpeculationPolicy.STREAM_STEPS`): a multi-step round hands
    its tokens over together, and a stream's inter-token latency is the round's length.
    """

    prompts: tuple[tuple[int, ...], ...]
    max_new_tokens: int = DEFAULTS.max_new_tokens
    sampling: SamplingParams = SamplingParams()
    eos_token_id: int | None = None
    speculation_length: int = DEFAULTS.speculation_length
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    resumed: int = 0
    streamed: bool = False


@dataclass
class StepResult:
    """A session's tokens per row since its last take (empty for finished rows), and whether it is done."""

    tokens: list[list[int]]
    done: bool
    finish_reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SessionSummary:
    """What a closed session generated, per row: the whole sequence (prompt + generated), the
    prompt's length and the finish reason ("eos", "length", "stop"; "" when it was closed before
    finishing); the speculation counts summed over its rows, and how many of its prompts' tokens
    were not prefilled but taken from a kept cache row (prefix reuse)."""

    sequences: list[list[int]]
    prompt_lengths: list[int]
    finish: list[str]
    speculation: SpeculationStats
    reused_tokens: int = 0

    @property
    def generated(self) -> list[list[int]]:
        """The generated tokens per row (prompt excluded; a matched stop sequence excluded)."""
        return [seq[n:] for seq, n in zip(self.sequences, self.prompt_lengths)]


@dataclass
class GenerationRound:
    """What one `generate_batch` round did: per admitted request its session (or the error that
    refused it), the new tokens of every session the caller holds, and the summaries of the
    sessions that ended (closed by the caller, or finished in this step). In a round stream
    (`cluster.generation.rounds`) `tags` names the admitted requests, in `opened`'s order."""

    opened: list[int | ClusterError] = field(default_factory=list)
    tags: list[Any] = field(default_factory=list)
    steps: dict[int, StepResult] = field(default_factory=dict)
    summaries: dict[int, SessionSummary] = field(default_factory=dict)


__all__ = ["MAX_SEED", "MAX_TEMPERATURE", "GenerationRequest", "GenerationRound", "SamplingParams",
           "SessionSummary", "StepResult"]
