"""Models that ship with tpcluster (ported to cluster.parallel_layers), and the compiler of Hugging Face
checkpoint folders into saved models (`compile`, `ensure_compiled`: cluster.models.hub)."""

from __future__ import annotations

from typing import Any

__all__ = ["CompileOptions", "CompileSummary", "compile", "ensure_compiled", "is_checkpoint"]


def __getattr__(name: str) -> Any:
    # imported on first use: the gateway reaches cluster.models.inputs without loading the compiler
    if name in __all__:
        from cluster.models import hub

        return getattr(hub, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
