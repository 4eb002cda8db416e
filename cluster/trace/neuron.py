"""The neuron backend: a TP rank's shard compiled for a NeuronCore, on either documented Neuron path.

Two paths, picked from what is installed (`neuron_path`):

- `xla`: torch-neuronx over torch-xla (inf2, trn1). Written for torch-neuronx 2.9.0.2.15.32035 with
  neuronx-cc 2.26.6360.0, i.e. torch 2.9 / torch-xla 2.9: the last PyTorch/XLA build (Neuron 2.31; still the
  "PyTorch NeuronX" version in Neuron 2.33's release notes). deploy/neuron-constraints.txt pins these and cites
  the release notes; pyproject.toml's torch>=2.9 is for this path. It uses no torch.export API. Each rank is
  its own process (a Ray actor holding one NeuronCore) and `torch_neuronx.trace`s its own shard, as
  NxD's non-SPMD trace does (neuronx-distributed src/neuronx_distributed/trace/trace.py, `_trace`).
  The layers' reductions are `xm.all_reduce` / `xm.all_gather` over the TP replica group, as NxD's
  parallel_layers/comm.py issues them, so they compile into the NEFF as Neuron collectives. A loaded
  graph is bound to its core as NxD's `TensorParallelNeuronModel._load` does it: weights replaced,
  `torch.ops.neuron._load_collectives_neuron(model, nc, 1, rank, world)`, then
  `torch_neuronx.move_trace_to_device`.
- `native`: native TorchNeuron (trn2, trn3; Neuron 2.33+ "TorchNeuron", beta: torch-neuronx 2.13.3.0 for
  torch 2.13, Python 3.12+; Neuron 2.33.0 TorchNeuron release notes). It saves graphs as the cpu backend does,
  so it needs the torch.export API of torch 2.13 and refuses an older torch (`check_torch_export`). `torch_neuronx`
  registers a `neuron` device and a `neuron` torch.distributed backend (Neuron docs, "How to use
  torch.distributed on Neuron", torch/guides/torch-distributed). Each rank joins a `neuron` process
  group; the layers' reductions are functional collectives on it; the shard is exported with
  torch.export (the cpu backend's portable graph file) and compiled with
  `torch.compile(backend="neuron")` on the rank (Neuron docs, "torch.compile on Neuron": compilation
  is just-in-time and cached as NEFFs).

On both paths the rank's gloo group (formed before the backend is known) stays the control plane
only: it carries the rendezvous of the Neuron runtime's collectives (`NEURON_RT_ROOT_COMM_ID`) and
never a tensor of a graph. The graph's collectives are Neuron collectives or nothing.
"""

from __future__ import annotations

import importlib.util
import io
import os
import socket
from collections.abc import Callable
from typing import Any

import torch

from cluster.errors import ArtifactError, BackendUnavailable
from cluster.parallel_layers import parallel_state
from cluster.trace.backend_base import Backend
from cluster.trace.cpu import CpuBackend, check_torch_export

#: the key under which rank 0 publishes the Neuron runtime's collective root, in the rank group's store
ROOT_COMM_KEY = "tpcluster/neuron_rt_root_comm_id"
_PREPARED: dict[tuple[int, int, str], Any] = {}  # (rank, world, path) -> this process's collectives


def neuron_path(installed: Callable[[str], bool] | None = None) -> str | None:
    """Which Neuron path this machine has: "xla" (torch-neuronx with torch-xla: inf2/trn1),
    "native" (torch-neuronx without torch-xla: native TorchNeuron on trn2/trn3), or None."""
    has = installed or (lambda name: importlib.util.find_spec(name) is not None)
    if not has("torch_neuronx"):
        return None
    return "xla" if has("torch_xla") else "native"


def runtime_environment(rank: int, world_size: int, root_comm_id: str, path: str) -> dict[str, str]:
    """The environment the Neuron runtime of one rank process needs, set before it starts.

    Ranks of one replica are packed on one node (one NeuronCore each, Ray's `neuron_cores`; Ray
    sets NEURON_RT_VISIBLE_CORES to the core it assigned, which is kept). NEURON_RT_ROOT_COMM_ID is
    set explicitly because the PJRT plugin's default is a fixed port (MASTER_ADDR:62182, torch-neuronx
    pjrt plugin `set_rt_root_comm_id`), which two replicas on one node would share.
    """
    env = {
        "RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size),
    }
    if root_comm_id:  # a single rank has no collectives to bootstrap
        env["NEURON_RT_ROOT_COMM_ID"] = root_comm_id
    if path == "xla":
        # One PJRT process per rank, one device each: what torch-neuronx's plugin sets for xmp.spawn
        # (`initialize_env`, `num_local_processes`), set here because Ray, not xmp, starts the ranks.
        env.update({
            "PJRT_DEVICE": "NEURON",
            "NEURON_PJRT_PROCESS_INDEX": str(rank),
            "NEURON_PJRT_PROCESSES_NUM_DEVICES": ",".join("1" for _ in range(world_size)),
        })
    return env


def _root_comm_id(rank: int, node: str, store: Any) -> str:
    """Rank 0 picks a free port on its node and publishes host:port; the others read it (bounded by the store's timeout)."""
    if rank == 0:
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        value = f"{node}:{port}"
        store.set(ROOT_COMM_KEY, value)
        return value
    return store.get(ROOT_COMM_KEY).decode("utf-8")


class XlaCollectives:
    """The layers' collectives as NxD issues them on torch-xla: one replica group of every TP rank."""

    def __init__(self, world_size: int) -> None:
        self.groups = [list(range(world_size))]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch_xla.core.xla_model as xm

        return xm.all_reduce(xm.REDUCE_SUM, tensor, groups=self.groups)

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        import torch_xla.core.xla_model as xm

        return xm.all_gather(tensor, dim=dim % tensor.dim(), groups=self.groups, pin_layout=False)


class NativeCollectives:
    """The layers' collectives as functional collectives on the `neuron` process group (traceable)."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol

        return funcol.all_reduce(tensor, "sum", self.group)

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        from torch.distributed import _functional_collectives as funcol

        return funcol.all_gather_tensor(tensor, dim % tensor.dim(), self.group)


class _NeuronBase(Backend):
    name = "neuron"
    path = ""
    shares_graphs = False  # every rank compiles its own shard (NxD's non-SPMD trace)

    def __init__(self) -> None:
        self.rank, self.world_size = 0, 1
        self._bound: dict[int, Any] = {}  # id(graph) -> its bound call (a graph is loaded onto the core once)

    def prepare_rank(self, rank: int, world_size: int, node: str) -> None:
        """Give this rank process the Neuron runtime's environment and its collectives, before its model is built."""
        import torch.distributed as dist

        self.rank, self.world_size = rank, world_size
        if world_size == 1:
            os.environ.update(runtime_environment(0, 1, "", self.path))
            parallel_state.set_rank(0, 1, None)
            return
        key = (rank, world_size, self.path)
        if key not in _PREPARED:  # once per process: the runtime reads its environment once, when it starts
            if not dist.is_initialized():
                raise BackendUnavailable("the neuron backend's ranks bootstrap from the rank group's store, and this "
                                         "rank has none: start ranks through parallel_model_trace / parallel_model_load")
            root = _root_comm_id(rank, node, dist.distributed_c10d._get_default_store())
            os.environ.update(runtime_environment(rank, world_size, root, self.path))
            _PREPARED[key] = self._collectives()
        parallel_state.set_rank(rank, world_size, _PREPARED[key])

    def _collectives(self) -> Any:
        raise NotImplementedError


class XlaNeuronBackend(_NeuronBase):
    """inf2/trn1: torch_neuronx.trace per rank, TorchScript graph files, NEFFs loaded with collectives."""

    path = "xla"

    def _collectives(self) -> XlaCollectives:
        return XlaCollectives(self.world_size)

    def trace(self, model, example, weights, compiler_workdir=None, compiler_args=None):
        import torch_neuronx

        traced = torch_neuronx.trace(
            model, example, compiler_workdir=compiler_workdir, compiler_args=compiler_args,
            inline_weights_to_neff=weights is None,
        )
        # Bound exactly as a loaded graph is, so a traced and a loaded model take one path onto the core.
        return self.load(self.dump(traced), "traced graph")

    def dump(self, graph) -> bytes:
        buffer = io.BytesIO()
        torch.jit.save(graph, buffer)
        return buffer.getvalue()

    def load(self, blob, source):
        import torch_neuronx

        try:
            with torch_neuronx.contexts.disable_nrt_load():  # loaded onto the core in bind, with collectives
                return torch.jit.load(io.BytesIO(blob))
        except Exception as exc:
            raise ArtifactError(f"{source}: cannot load Neuron graph: {exc}") from exc

    def bind(self, graph, weights, state=None):
        call = self._bound.get(id(graph))
        if call is None:
            call = self._bound[id(graph)] = _XlaCall(graph, weights, self.rank, self.world_size)
        else:
            call.weights = weights
        return call


class _XlaCall:
    """A NEFF on this rank's core. Weights the rank changed in place (replace_weights, state outputs)
    are swapped in before the next run (`torch_neuronx.replace_weights`, then moved to the core)."""

    def __init__(self, graph: Any, weights: dict[str, torch.Tensor] | None, rank: int, world_size: int) -> None:
        self.graph, self.weights = graph, weights
        self.rank, self.world_size = rank, world_size
        self._versions: dict[str, int] | None = None
        self._loaded = False

    def __call__(self, *inputs: torch.Tensor) -> Any:
        import torch_neuronx

        versions = {k: v._version for k, v in self.weights.items()} if self.weights is not None else {}
        if self.weights is not None and versions != self._versions:
            torch_neuronx.replace_weights(self.graph, self.weights)
            self._versions = versions
            if self._loaded:
                torch_neuronx.move_trace_to_device(self.graph, 0)
        if not self._loaded:
            # NxD trace.py TensorParallelNeuronModel._load: (model, nc index, nc count, global rank, world);
            # this process sees one core (NEURON_RT_VISIBLE_CORES), so its index is 0.
            torch.ops.neuron._load_collectives_neuron(self.graph, 0, 1, self.rank, self.world_size)
            torch_neuronx.move_trace_to_device(self.graph, 0)
            self._loaded = True
        return self.graph(*inputs)


class NativeNeuronBackend(_NeuronBase, CpuBackend):
    """trn2/trn3: the shard exported with torch.export (functional collectives on the `neuron` group),
    saved as the cpu backend saves it, compiled on the rank with torch.compile(backend="neuron")."""

    loads_lazily = False  # compiled for the device when bound: at load, as on the other Neuron path
    path = "native"
    device = "neuron"

    def _collectives(self) -> NativeCollectives:
        import torch.distributed as dist

        # A group of its own beside the gloo control group; creating it runs TorchNeuron's runtime setup.
        return NativeCollectives(dist.new_group(list(range(self.world_size)), backend="neuron"))

    def bind(self, graph, weights, state=None):
        call = self._bound.get(id(graph))
        if call is None:
            module = graph.module(check_guards=False)
            module.validate_inputs = False
            call = self._bound[id(graph)] = _NativeCall(graph, torch.compile(module, backend="neuron"), weights, self.device)
        else:
            call.weights = weights
        return call


class _NativeCall:
    """The compiled program on the rank's `neuron` device; host weights changed in place are copied over first."""

    def __init__(self, graph: Any, compiled: Callable[..., Any], weights: dict[str, torch.Tensor] | None, device: str) -> None:
        self.compiled, self.weights, self.device = compiled, weights, torch.device(device)
        self.order = graph.call_spec.in_spec.child(0).child(0).context if weights is not None else []
        self._on_device: dict[str, torch.Tensor] = {}
        self._versions: dict[str, int] = {}

    def __call__(self, *inputs: torch.Tensor) -> Any:
        moved = tuple(t.to(self.device) for t in inputs)
        if self.weights is None:
            return _to_host(self.compiled(*moved))
        for name in self.order:
            host = self.weights[name]
            if self._versions.get(name) != host._version:
                self._on_device[name] = host.to(self.device)
                self._versions[name] = host._version
        return _to_host(self.compiled({name: self._on_device[name] for name in self.order}, *moved))


def _to_host(outputs: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, outputs)


def NeuronBackend() -> _NeuronBase:  # a factory under the old class name
    """The neuron backend for the path this machine has (see `neuron_path`)."""
    path = neuron_path()
    if path is None:
        raise BackendUnavailable(
            "backend='neuron' needs torch-neuronx (inf2/trn1: torch-neuronx with torch-xla; trn2/trn3: native "
            "TorchNeuron); use backend='cpu' or 'auto' on other machines, and `tpcluster doctor` to check an install"
        )
    if path == "xla":
        return XlaNeuronBackend()
    check_torch_export("the neuron backend's native (TorchNeuron) path")
    return NativeNeuronBackend()
