"""Input signatures: the shapes and dtypes a traced graph takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from cluster.errors import InputError


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "int64"

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "TensorSpec":
        return cls(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))

    def describe(self) -> str:
        return f"{self.dtype}[{', '.join(map(str, self.shape))}]"

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TensorSpec":
        return cls(tuple(int(d) for d in data["shape"]), str(data["dtype"]))


Signature = tuple[TensorSpec, ...]


def describe_signature(signature: Signature) -> str:
    return "(" + ", ".join(spec.describe() for spec in signature) + ")"


def signature_of(inputs: Sequence[torch.Tensor]) -> Signature:
    return tuple(TensorSpec.of(t) for t in inputs)


def as_input_tuple(inputs: Any, what: str = "inputs") -> tuple[torch.Tensor, ...]:
    """Normalise one call's inputs (a tensor or a tuple/list of tensors) to a tuple of tensors."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs)
    raise InputError(f"{what} must be a tensor or a non-empty tuple of tensors, got {type(inputs).__name__}")
