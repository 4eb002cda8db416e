"""Stand-ins for torch_neuronx, torch_xla and the native `neuron` process-group backend, for the contract tests.

They record every call (name, arguments, the Neuron environment at the time) in `RECORD`, and they
compute: a "NEFF" is a TorchScript trace of the rank's module whose collectives are the stand-in ops
`standin_neuron::all_reduce` / `all_gather`, which exchange tensors between the rank processes through
a store hosted at NEURON_RT_ROOT_COMM_ID (rank 0 hosts it) — the runtime's collective bootstrap as the
backend set it, so a wrong address fails the test. Nothing here touches gloo.

They prove the wiring (what the backend calls, with which arguments and environment, in which order),
not the hardware.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import io
import os
import sys
import types
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

RECORD: list[dict[str, Any]] = []
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NEURON_RT_ROOT_COMM_ID", "NEURON_RT_VISIBLE_CORES", "PJRT_DEVICE",
            "NEURON_PJRT_PROCESS_INDEX", "NEURON_PJRT_PROCESSES_NUM_DEVICES")


def record(call: str, **details: Any) -> None:
    RECORD.append({"call": call, "env": {k: os.environ.get(k) for k in ENV_KEYS}, **details})


class _Link:
    """The stand-in NeuronLink: an all-gather through a store at NEURON_RT_ROOT_COMM_ID."""

    store: Any = None
    seq = 0

    @classmethod
    def gather(cls, tensor: torch.Tensor) -> list[torch.Tensor]:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if cls.store is None:
            host, port = os.environ["NEURON_RT_ROOT_COMM_ID"].rsplit(":", 1)
            cls.store = dist.TCPStore(host, int(port), world, is_master=rank == 0, timeout=timedelta(seconds=30))
        cls.seq += 1
        buffer = io.BytesIO()
        torch.save(tensor.detach().clone(), buffer)
        cls.store.set(f"cc/{cls.seq}/{rank}", buffer.getvalue())
        return [torch.load(io.BytesIO(cls.store.get(f"cc/{cls.seq}/{r}"))) for r in range(world)]


@torch.library.custom_op("standin_neuron::all_reduce", mutates_args=())
def neff_all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """A Neuron collective compiled into a NEFF (stand-in): runs on the stand-in link."""
    record("neff.all_reduce", shape=list(tensor.shape))
    parts = _Link.gather(tensor)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


@torch.library.custom_op("standin_neuron::all_gather", mutates_args=())
def neff_all_gather(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    record("neff.all_gather", shape=list(tensor.shape), dim=dim)
    return torch.cat(_Link.gather(tensor), dim=dim)


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


# -- torch_xla (inf2/trn1 path) ---------------------------------------------------------------
def _xm_all_reduce(op: str, tensor: torch.Tensor, groups: Any = None, pin_layout: bool = True) -> torch.Tensor:
    record("xm.all_reduce", op=op, groups=groups)
    return torch.ops.standin_neuron.all_reduce(tensor)


def _xm_all_gather(tensor: torch.Tensor, dim: int = 0, groups: Any = None, pin_layout: bool = True) -> torch.Tensor:
    record("xm.all_gather", dim=dim, groups=groups, pin_layout=pin_layout)
    return torch.ops.standin_neuron.all_gather(tensor, dim)


# -- torch_neuronx (both paths) ---------------------------------------------------------------
def _trace(model: torch.nn.Module, example: tuple, compiler_workdir: Any = None, compiler_args: Any = None,
           inline_weights_to_neff: bool = True, **kwargs: Any) -> torch.jit.ScriptModule:
    record("torch_neuronx.trace", compiler_workdir=compiler_workdir, compiler_args=compiler_args,
           inline_weights_to_neff=inline_weights_to_neff, gloo_initialized=_gloo_default())
    with torch.no_grad():
        return torch.jit.trace(model, example, check_trace=False)


def _replace_weights(graph: torch.jit.ScriptModule, weights: dict[str, torch.Tensor]) -> None:
    record("torch_neuronx.replace_weights", keys=sorted(weights))
    own = dict(graph.named_parameters())
    own.update(dict(graph.named_buffers()))
    with torch.no_grad():
        for name, value in weights.items():
            own[name].copy_(value)


@contextlib.contextmanager
def _disable_nrt_load():
    record("torch_neuronx.contexts.disable_nrt_load")
    yield


def _load_collectives_neuron(graph: Any, nc: int, nc_count: int, global_rank: int, world: int) -> None:
    record("torch.ops.neuron._load_collectives_neuron", args=[nc, nc_count, global_rank, world])


def _gloo_default() -> bool:
    return dist.is_initialized() and dist.get_backend() == "gloo"


# -- the native `neuron` process group (trn2/trn3 path) ---------------------------------------
class StandInNeuronGroup(dist.ProcessGroup):
    """A Python ProcessGroup, as TorchNeuron's ProcessGroupNeuron is, over the stand-in link."""

    def __init__(self, rank: int, size: int) -> None:
        super().__init__(rank, size)
        self._world = size

    def getBackendName(self) -> str:  # torch's method name
        return "neuron"

    def _set_group_name(self, name: str) -> None:  # as ProcessGroupNeuron keeps it: c10d names the group here
        self._group_name = name

    @property
    def group_name(self) -> str:
        return self._group_name

    def allreduce(self, tensors, opts=None):
        record("pg_neuron.allreduce")
        for tensor in tensors:
            tensor.copy_(neff_all_reduce(tensor))
        return _done(tensors)

    def _allgather_base(self, output, tensor, opts=None):
        record("pg_neuron.allgather")
        output.copy_(neff_all_gather(tensor, 0))
        return _done([output])

    def allgather_into_tensor_coalesced(self, outputs, tensors, opts=None):
        for output, tensor in zip(outputs, tensors):
            self._allgather_base(output, tensor)
        return _done(outputs)


def _done(tensors: list[torch.Tensor]) -> Any:
    future = torch.futures.Future()
    future.set_result(tensors)
    return torch._C._distributed_c10d._create_work_from_future(future)


def _create_neuron_group(store: Any, rank: int, size: int, timeout: Any) -> StandInNeuronGroup:
    record("dist.new_group(backend='neuron')", rank=rank, size=size)
    return StandInNeuronGroup(rank, size)


def _compile(module: Any, backend: str = "inductor", **kwargs: Any) -> Any:
    record("torch.compile", backend=backend)
    return module  # the stand-in "compiler" runs the exported program as is


def install(path: str) -> None:
    """Put the stand-ins for `path` ("xla" or "native") in place in this process."""
    neuronx = _module("torch_neuronx", trace=_trace, replace_weights=_replace_weights,
                      move_trace_to_device=lambda graph, index: record("torch_neuronx.move_trace_to_device", index=index))
    neuronx.contexts = _module("torch_neuronx.contexts", disable_nrt_load=_disable_nrt_load)
    torch.ops.neuron = types.SimpleNamespace(_load_collectives_neuron=_load_collectives_neuron)
    if path == "xla":
        xla = _module("torch_xla")
        xla.core = _module("torch_xla.core")
        xla.core.xla_model = _module("torch_xla.core.xla_model", REDUCE_SUM="sum", all_reduce=_xm_all_reduce,
                                     all_gather=_xm_all_gather)
    else:
        for name in [n for n in sys.modules if n == "torch_xla" or n.startswith("torch_xla.")]:
            del sys.modules[name]
        dist.Backend.register_backend("neuron", _create_neuron_group, devices=["cpu"])
        torch.compile = _compile
