"""What the generation loop needs of one model: `DecoderEndpoint`, the port a coordinator implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from cluster.generation.layout import DecoderLayout
    from cluster.generation.plan import Call


@dataclass
class DecoderEndpoint:
    """What the loop needs of one model: its layout and vocabulary, and one call to its ranks,
    `run(call)`, where call is one of the cluster.generation.plan call types.

    multi_step: its ranks run `DecodeSteps` (several decode steps in one call). A draft fused into
    the target (its ranks run `FusedRound`) has an endpoint of its own that is `fused`: its calls go
    to the target's ranks.
    """

    run: Callable[[Call], Any]
    layout: DecoderLayout
    vocab_size: int
    name: str = "model"
    key: str = ""  # identifies the replica (and so its KV cache) behind the calls
    fused: bool = False
    multi_step: bool = False
    ngram: bool = False  # no draft model: proposals by n-gram lookup in each row's own tokens (cluster.generation.ngram)


__all__ = ["DecoderEndpoint"]
