"""Generation defaults and limits, in one home.

The library (`generate`, `stream_generate`, `GenerationRequest`) and the gateway's codec read the
same values from `DEFAULTS`, so a default changes in one place. No torch here: the gateway imports
this without the model code.

On the wire (proto3) an unset number arrives as 0; `DEFAULTS.resolve` turns those zeros into the
defaults:

    DEFAULTS.resolve(max_new_tokens=0, top_p=0.0, speculation_length=0)  # -> (64, 1.0, 0)

speculation_length 0 is itself a setting: with a draft, each round picks how many proposals pay
(`cluster.generation.adaptive`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationDefaults:
    """What a generation does when the caller does not say, and the largest values it may ask for.

    temperature 0 is greedy; top_k 0 and top_p 1.0 keep every token (filtering off);
    speculation_length is the draft's proposals per round when a draft model is given; 0 (the
    default): adaptive, each round picks 0 (plain decoding) up to the target's largest k from the
    measured acceptance and call costs.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    speculation_length: int = 0  # 0: adaptive
    max_new_tokens_limit: int = 4096
    speculation_length_limit: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError(f"GenerationDefaults.max_new_tokens must be 1..{self.max_new_tokens_limit}")
        if not 0 <= self.speculation_length <= self.speculation_length_limit:
            raise ValueError(f"GenerationDefaults.speculation_length must be 0 (adaptive) to {self.speculation_length_limit}")
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError("GenerationDefaults: temperature and top_k must be >= 0, top_p in (0, 1]")

    def resolve(self, max_new_tokens: int, top_p: float, speculation_length: int) -> tuple[int, float, int]:
        """(max_new_tokens, top_p, speculation_length) with each 0 (unset on the wire) replaced by its default.

        Only zeros are replaced; range checks stay with the caller (the codec, SamplingParams, the engine).
        """
        return (max_new_tokens or self.max_new_tokens, top_p or self.top_p,
                speculation_length or self.speculation_length)


DEFAULTS = GenerationDefaults()

__all__ = ["DEFAULTS", "GenerationDefaults"]
