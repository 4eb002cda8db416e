"""What a traced model is, apart from its graphs and weights: the state the coordinator serves from
and an artifact records (`ModelState`), and a traced model as the ranks hand it over (`Exported`).

Plain dataclasses that import no torch: the coordinator, its handle and `cluster.trace.artifact`
all read them, and none of those needs another to do so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # types only: this module imports no torch
    from cluster.signature import Signature


@dataclass
class ModelState:
    """What the coordinator knows of the model it serves; also what an artifact records."""

    tp_degree: int
    backend: str
    inline_weights: bool
    buckets: list[Signature]
    kernel: bytes | None = None  # TorchScript bucket kernel, as saved
    partition_dims: dict[str, int] = field(default_factory=dict)
    state_keys: list[str] = field(default_factory=list)
    trace_mode: list[str] = field(default_factory=list)  # per bucket: "once" or "per-rank"
    io_aliases: dict[str, int] = field(default_factory=dict)  # state weight name -> output index
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"decoder": layout, vocab, eos}


@dataclass
class Exported:
    """A traced model as the ranks hand it over, for cluster.trace.artifact to write."""

    state: ModelState
    ranks: list[Any]  # RankExport per rank


__all__ = ["Exported", "ModelState"]
