"""The cpu backend (torch.export) and the eager backend (no tracing).

- `cpu`: torch.export; collectives are captured as functional collectives. With separated weights
  the module is exported with its weights as an explicit input, so the graph holds none and every
  rank (and every bucket) can share one graph.
- `eager`: no tracing, the module itself; for in-process ranks (unit tests), cannot be saved.

Graph files of the cpu backend are safetensors files: tensors (inlined weights, constants) plus
the serialized program (JSON) in the header metadata. Nothing in them is unpickled. The neuron
backend's native path saves its graphs the same way (`cluster.trace.neuron`).
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import struct
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils._pytree import tree_unflatten

from cluster.errors import ArtifactError, BackendUnavailable
from cluster.trace.backend_base import Backend

_log = logging.getLogger("tpcluster.trace")
_PROGRAM_KEY = "tpcluster.program"
_DESERIALIZING = threading.Lock()


#: the torch the cpu backend (and the neuron backend's native path, which saves graphs as it does) is tested with
TESTED_EXPORT_TORCH = "2.13"


@functools.cache
def missing_export_support() -> tuple[str, ...]:
    """The torch.export APIs the cpu backend uses that this torch lacks; () with torch 2.13.

    pyproject.toml admits torch 2.9 for the neuron backend's `xla` path (the Neuron SDK's torch-neuronx 2.9 brings
    torch 2.9), which has none of these; that path uses none of them (TorchScript graphs from torch_neuronx.trace).
    """
    from torch._export.serde import serialize as serde
    from torch.utils._pytree import TreeSpec

    missing = []
    if not hasattr(TreeSpec, "child"):
        missing.append("torch.utils._pytree.TreeSpec.child")
    if "serialize_state_dict" not in inspect.signature(serde.serialize).parameters:
        missing.append("torch._export.serde.serialize.serialize(serialize_state_dict=...)")
    if not hasattr(serde, "_resolve_schema_cls"):
        missing.append("torch._export.serde.serialize._resolve_schema_cls")
    return tuple(missing)


def check_torch_export(what: str) -> None:
    """Refuse, naming the torch needed, to run `what` (the cpu backend, the native Neuron path) on a torch without
    the torch.export APIs it uses, instead of failing later inside a rank with an AttributeError or TypeError."""
    missing = missing_export_support()
    if missing:
        raise BackendUnavailable(
            f"{what} needs torch {TESTED_EXPORT_TORCH} (the torch.export API it is written and tested against); this "
            f"is torch {torch.__version__}, which lacks {', '.join(missing)}. With the Neuron SDK's torch-neuronx 2.9 "
            "(torch 2.9, inf2/trn1) use backend='neuron' or 'auto'; elsewhere install torch 2.13 (pyproject.toml)"
        )


class _WeightsAsInputs(nn.Module):
    """Calls `model` with weights passed in, so the exported graph carries none of its own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "inner", model)  # not a submodule: its tensors must not be lifted

    def forward(self, weights: dict[str, torch.Tensor], *inputs: torch.Tensor) -> Any:
        return torch.func.functional_call(self.inner, weights, inputs)


class CpuBackend(Backend):
    name = "cpu"
    shares_graphs = True
    loads_lazily = True
    keeps_survivors = True

    def trace(self, model, example, weights, compiler_workdir=None, compiler_args=None):
        with torch.no_grad():
            if weights is None:
                return torch.export.export(model, example)
            return torch.export.export(_WeightsAsInputs(model), (weights, *example))

    def dump(self, graph: torch.export.ExportedProgram) -> bytes:
        from safetensors.torch import save
        from torch._export.serde.serialize import serialize

        artifact = serialize(graph, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False)
        parameters = set(graph.graph_signature.parameters)
        tensors = {
            f"{'param' if k in parameters else 'state'}/{k}": v.detach().contiguous().clone()
            for k, v in graph.state_dict.items()
        }
        for key, value in graph.constants.items():
            if not isinstance(value, torch.Tensor):
                raise ArtifactError(f"traced graph holds a non-tensor constant {key!r} ({type(value).__name__}); cannot store it without pickle")
            tensors[f"const/{key}"] = value.detach().contiguous().clone()
        return save(tensors, metadata={_PROGRAM_KEY: artifact.exported_program.decode("utf-8")})

    def load(self, blob: bytes, source: str) -> torch.export.ExportedProgram:
        from safetensors.torch import load

        from cluster.trace.program_serde import deserialize_program

        try:
            metadata = _safetensors_metadata(blob)
            program = metadata[_PROGRAM_KEY].encode("utf-8")
            tensors = load(blob)
        except Exception as exc:
            raise ArtifactError(f"{source}: not a tpcluster cpu graph file ({exc})") from exc
        state: dict[str, torch.Tensor] = {k.removeprefix("state/"): v for k, v in tensors.items() if k.startswith("state/")}
        state.update({k.removeprefix("param/"): nn.Parameter(v, requires_grad=False) for k, v in tensors.items() if k.startswith("param/")})
        constants = {k.removeprefix("const/"): v for k, v in tensors.items() if k.startswith("const/")}
        try:
            with _DESERIALIZING:  # torch's deserializer is not safe in two threads of one process
                return deserialize_program(program, state, constants)
        except Exception as exc:
            raise ArtifactError(f"{source}: graph does not deserialize with torch {torch.__version__}: {exc}") from exc

    def bind(self, graph, weights, state=None):
        # The coordinator checks every input against its bucket's signature before a rank sees it;
        # torch.export's own per-call guard and constraint checks cost ~1 ms a step on these machines.
        if weights is not None:
            order = graph.call_spec.in_spec.child(0).child(0).context  # the weight names, as traced
            missing = [name for name in order if name not in weights]
            if missing:
                raise ArtifactError(f"the graph needs weights the rank does not hold: {missing[:8]}")
            if _flat_user_program(graph, len(order)):
                positions = {order.index(name): index for name, index in (state or {}).items() if name in order}
                return _FlatCall(graph, [weights[name] for name in order], positions)
        module = graph.module(check_guards=False)
        module.validate_inputs = False
        if weights is None:
            return module
        return functools.partial(module, {name: weights[name] for name in order})


    def compiled(self, call, graph_file, threads, build=False):
        if not isinstance(call, _FlatCall) or graph_file is None:
            return call
        from cluster.trace.compiled import CompiledCall, compile_package, package_path

        path = package_path(graph_file, call.state, threads)
        module = _serving_module(call.graph, call.state)
        if build:
            compile_package(module, call.weights, call.state, threads, path)
        if not path.exists():
            return call
        try:
            return CompiledCall(path, module, call.graph.call_spec.out_spec, call.weights, call.state)
        except Exception as exc:  # noqa: BLE001 - a package that does not load here: the interpreted graph serves
            _log.warning("compiled graph %s does not load (%s); running the graph interpreted", path, exc)
            return call


def _flat_user_program(graph: torch.export.ExportedProgram, weight_count: int) -> bool:
    """The program takes only the caller's tensors (the weights, then one tensor per input) and returns
    only its outputs: no lifted state, constants or mutations for `ExportedProgram.module()` to handle."""
    signature = graph.graph_signature
    args = graph.call_spec.in_spec.child(0)
    return (
        all(spec.kind == InputKind.USER_INPUT for spec in signature.input_specs)
        and all(spec.kind == OutputKind.USER_OUTPUT for spec in signature.output_specs)
        and all(args.child(i).is_leaf() for i in range(1, args.num_children))
        and len(signature.input_specs) == weight_count + args.num_children - 1
    )


class _FlatCall:
    """A program with separated weights, called through its graph module with flat arguments.

    What `ExportedProgram.module()` would run, without building it: unlifting copies the graph and
    regenerates its code (~0.1 s of CPU per bucket graph here, ~20% of a rank's load), and has
    nothing to unlift when the weights are inputs (see `_flat_user_program`). The module run is
    `_serving_module`'s, made on the first call (so loading a rank's graphs pays nothing for it).
    """

    def __init__(self, graph: torch.export.ExportedProgram, weights: list[torch.Tensor],
                 state: dict[int, int] | None = None) -> None:
        self.graph = graph
        self.state = dict(state or {})  # input position of a state weight -> its output index
        self._module: Callable[..., Any] | None = None
        self.weights = weights
        self._out_spec = graph.call_spec.out_spec

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if self._module is None:
            self._module = _serving_module(self.graph, self.state)
        return tree_unflatten(list(self._module(*self.weights, *inputs)), self._out_spec)


_SERVING_MODULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # program -> {state key: module}


def _serving_module(graph: torch.export.ExportedProgram, state: dict[int, int]) -> torch.fx.GraphModule:
    """The program's graph module, rewritten to run cheaper with the same outputs (made once per program
    and state, on a copy: the program itself stays as traced, and is saved as traced).

    - A state output that is the state input's leading rows with new entries scattered in
      (`scatter(state[:B], ...)`, the KV-cache write of cluster.models.llama) scatters into the
      state in place: its output is then the state's own rows and the rank copies nothing back.
      A functional program copies each cache's rows twice a step (into the scatter's result, then
      back into the state): 24 copies of 256 KB a decode step of the shipped target, ~0.5 ms of 6.
    - torch.export's dtype assertions (`_assert_tensor_metadata`, one per `.to()`) and `.to()` calls
      to the dtype a tensor already has go: the inputs are checked against the bucket's signature
      before a rank runs the graph, and every dtype inside follows from those (~0.3 ms a step).
    """
    key = tuple(sorted(state.items()))
    cached = _SERVING_MODULES.setdefault(graph, {})
    if key in cached:
        return cached[key]
    source = graph.graph_module
    new = copy.deepcopy(source.graph)
    placeholders = [node for node in new.nodes if node.op == "placeholder"]
    outputs = next(node for node in new.nodes if node.op == "output").args[0]
    for position, index in state.items():
        _scatter_in_place(placeholders[position], outputs[index] if index < len(outputs) else None)
    for node in list(new.nodes):
        if node.op != "call_function":
            continue
        if node.target is _aten._assert_tensor_metadata.default and not node.users:
            new.erase_node(node)
        elif (node.target is _aten.to.dtype and len(node.args) == 2 and not node.kwargs
              and _dtype_of(node.args[0]) == node.args[1]):
            node.replace_all_uses_with(node.args[0])  # `.to()` to its own dtype returns the tensor itself
            new.erase_node(node)
    module = torch.fx.GraphModule(source, new)
    cached[key] = module
    return module


_aten = torch.ops.aten


def _scatter_in_place(state: torch.fx.Node, output: Any) -> bool:
    """Turn `output = scatter(state[:B] or state, ...)` into the in-place scatter, where the state input
    is read by nothing else (so no node can see it before or after the write)."""
    if not isinstance(output, torch.fx.Node) or output.target is not _aten.scatter.src:
        return False
    base = output.args[0]
    if base is not state:
        if not (isinstance(base, torch.fx.Node) and base.target is _aten.slice.Tensor and base.args[0] is state
                and tuple(base.args[1:3]) == (0, 0) and len(base.users) == 1):
            return False
    if len(state.users) != 1:
        return False
    output.target = _aten.scatter_.src
    return True


def _dtype_of(node: Any) -> torch.dtype | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


class EagerBackend(Backend):
    """No tracing: the rank runs its module as is (in-process ranks, tests)."""

    name = "eager"
    keeps_survivors = True

    def trace(self, model, example, weights, compiler_workdir=None, compiler_args=None):
        return model

    def dump(self, graph) -> bytes:
        raise ArtifactError("backend 'eager' keeps no graph to save; trace with backend='cpu' to save the model")

    def bind(self, graph, weights, state=None):
        return graph  # the module holds the very tensors of `weights`: in-place replacement reaches it


def _safetensors_metadata(blob: bytes) -> dict[str, str]:
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    return header.get("__metadata__", {})


__all__ = ["TESTED_EXPORT_TORCH", "CpuBackend", "EagerBackend", "check_torch_export", "missing_export_support"]
