"""What a trace is asked to do, as frozen values built once at the entry point and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from cluster.signature import Signature

BACKENDS = ("auto", "cpu", "neuron", "eager")


@dataclass(frozen=True)
class BucketModelConfig:
    """torch_neuronx.BucketModelConfig: `bucket_kernel(*bucket_kernel_constant_args)` returns a
    TorchScript function taking the list of input tensors and returning
    `(padded_tensors, torch.tensor([bucket_idx]))`."""

    bucket_kernel: Callable[..., Any]
    bucket_kernel_constant_args: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if not callable(self.bucket_kernel):
            raise ValueError("BucketModelConfig.bucket_kernel must be a callable that returns a TorchScript function")

    def build_kernel(self) -> Any:
        kernel = self.bucket_kernel(*self.bucket_kernel_constant_args)
        if not hasattr(kernel, "save_to_buffer"):
            raise ValueError(
                "BucketModelConfig.bucket_kernel() must return a TorchScript function or module "
                "(wrap it with torch.jit.script), got " + type(kernel).__name__
            )
        return kernel


@dataclass(frozen=True)
class TraceSpec:
    """Everything a rank needs to build and trace its shard."""

    func_blob: bytes  # cloudpickled user function returning (model, io_aliases)
    tp_degree: int
    backend: str
    inline_weights: bool
    bucket_signatures: tuple[Signature, ...]
    cwd: str = ""
    compiler_workdir: str | None = None
    compiler_args: Any = None
    spmd_mode: bool | None = None  # None: trace once where the backend can, verified per bucket
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.tp_degree, int) or self.tp_degree < 1:
            raise ValueError(f"tp_degree must be a positive integer, got {self.tp_degree!r}")
        if self.backend not in BACKENDS[1:]:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not self.bucket_signatures:
            raise ValueError("at least one example input is needed to trace")
