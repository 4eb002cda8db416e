"""Tracing backends by name: which backend a name stands for on this machine (`resolve_backend`),
and a fresh one for a rank (`get_backend`).

- `cpu`: torch.export graphs, saved as safetensors files: `cluster.trace.cpu`.
- `neuron`: a NeuronCore graph per rank, on the Neuron path this machine has (torch-neuronx over
  torch-xla on inf2/trn1, native TorchNeuron on trn2/trn3): `cluster.trace.neuron`, imported only
  where the neuron backend is asked for.
- `eager`: no tracing, the module itself; for in-process ranks (unit tests), cannot be saved:
  `cluster.trace.cpu`.

Every backend implements `cluster.trace.backend_base.Backend`; the backend modules import that
interface, never this one.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from cluster.errors import BackendUnavailable
from cluster.trace.backend_base import Backend
from cluster.trace.cpu import CpuBackend, EagerBackend, check_torch_export


def resolve_backend(name: str) -> str:
    """The backend `name` stands for on this machine ("auto": neuron where torch-neuronx is, else cpu)."""
    if name == "auto":
        name = "neuron" if importlib.util.find_spec("torch_neuronx") is not None else "cpu"
    if name == "neuron" and importlib.util.find_spec("torch_neuronx") is None:
        raise BackendUnavailable(
            "backend='neuron' needs torch-neuronx (inf2/trn1: torch-neuronx with torch-xla; trn2/trn3: native "
            "TorchNeuron); use backend='cpu' or 'auto' on other machines, and `tpcluster doctor` to check an install"
        )
    if name == "cpu":
        check_torch_export("backend 'cpu'")
    return name


def get_backend(name: str) -> Backend:
    """A fresh backend object for one rank (the neuron backend keeps per-rank state)."""
    if name == "neuron":
        from cluster.trace.neuron import NeuronBackend

        return NeuronBackend()
    if name == "cpu":
        check_torch_export("backend 'cpu'")
    try:
        return {"cpu": CpuBackend, "eager": EagerBackend}[name]()
    except KeyError as exc:
        raise BackendUnavailable(f"unknown backend {name!r}; use 'cpu', 'neuron' or 'auto'") from exc


def keeps_survivors(name: str) -> bool:
    """`Backend.keeps_survivors` of the backend `name`, without making one (the cpu backend's checks
    import torch.export's serializer: ~1 s, 2-3 s on a busy node, in a coordinator that needs none of it)."""
    return {"cpu": CpuBackend, "eager": EagerBackend}.get(name, Backend).keeps_survivors


def __getattr__(name: str) -> Any:
    if name == "NeuronBackend":  # moved to cluster.trace.neuron; imported lazily, as get_backend does
        from cluster.trace.neuron import NeuronBackend

        return NeuronBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Backend", "CpuBackend", "EagerBackend", "check_torch_export", "get_backend", "keeps_survivors",
           "resolve_backend"]
