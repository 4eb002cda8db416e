"""What a finished generation reports, in one shape for the library and the gateway.

The field names are the wire's (tpcluster.v1 GenerateStats), so the gateway's codec copies them
as they are; times are milliseconds everywhere. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reason: str = ""  # length, eos, stop or cancelled ("" when rows differ: see the output's reasons)
    draft_tokens_proposed: int = 0
    draft_tokens_accepted: int = 0
    acceptance_rate: float = 0.0  # accepted over proposed draft tokens
    mean_accepted_length: float = 0.0  # tokens per speculative round per row (accepted + the target's one)
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0
    tokens_per_second: float = 0.0

    @classmethod
    def measure(cls, *, prompt_tokens: int, generated_tokens: int, finish_reasons: list[str], speculation: Any,
                first_token_s: float | None, total_s: float) -> "GenerationStats":
        """From counts and seconds; `speculation` is a SpeculationStats, or None for no speculation."""
        reasons = set(finish_reasons)
        return cls(
            prompt_tokens=prompt_tokens, generated_tokens=generated_tokens,
            finish_reason=reasons.pop() if len(reasons) == 1 else "",
            draft_tokens_proposed=int(speculation.proposed) if speculation is not None else 0,
            draft_tokens_accepted=int(speculation.accepted) if speculation is not None else 0,
            acceptance_rate=float(speculation.acceptance_rate) if speculation is not None else 0.0,
            mean_accepted_length=float(speculation.mean_accepted_length) if speculation is not None else 0.0,
            time_to_first_token_ms=(first_token_s or 0.0) * 1e3, total_ms=total_s * 1e3,
            tokens_per_second=generated_tokens / total_s if total_s else 0.0,
        )
