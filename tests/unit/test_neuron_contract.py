"""Contract tests of the neuron backend, on both Neuron paths, with stand-ins (tests/unit/neuron_standins.py).

Two rank processes each run a `RankWorker` as a Ray rank actor would (a real gloo group from
`init_collectives`), with stand-ins for torch_neuronx, torch_xla and the native `neuron` process group
that record every call. The tests pin what the backend calls, with which arguments and environment, in
which order, per rank, and that no gloo collective and no CPU collective op runs inside or is compiled
into what the backend traces. They prove the wiring, not the hardware: the `neuron`-marked tests
(tests/integration/test_neuron_hardware.py) run on a NeuronCore.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from cluster.parallel_layers.layers import ColumnParallelLinear, RowParallelLinear
from cluster.parallel_layers.sharding import partition_dims, split_state_dict

WORLD = 2
STEPS = 2  # decode steps after trace and again after load: each reads the state the previous one wrote


class TinyDecoder(nn.Module):
    """A TP block with a state buffer (the KV cache's role): column -> row (all-reduce) -> column (all-gather)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = ColumnParallelLinear(8, 16, gather_output=False)
        self.down = RowParallelLinear(16, 8, input_is_parallel=True)
        self.head = ColumnParallelLinear(8, 12, gather_output=True)
        self.register_buffer("cache", torch.zeros(2, 8))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cache + self.down(torch.relu(self.up(x)))
        return self.head(cache), cache


def full_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    shapes = {"up.weight": (16, 8), "up.bias": (16,), "down.weight": (8, 16), "down.bias": (8,),
              "head.weight": (12, 8), "head.bias": (12,)}
    state = {k: torch.randn(*s, generator=generator) * 0.3 for k, s in shapes.items()}
    state["cache"] = torch.zeros(2, 8)
    return state


def build_model() -> tuple[nn.Module, dict]:
    from cluster.parallel_layers import parallel_state

    model = TinyDecoder()
    rank, world = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_size()
    model.load_state_dict(split_state_dict(full_state(), partition_dims(model), rank, world))
    return model, {model.cache: 1}


EXAMPLE = (torch.linspace(-1, 1, 16).reshape(2, 8),)


def expected_outputs() -> list[list]:
    """The same sequence as `run_rank`, by the whole model in one process: 2 steps, reload, 2 steps, doubled weights, 1 step."""
    model, _ = build_model()
    out = []
    with torch.no_grad():
        for reset in (True, True):
            if reset:
                model.cache.zero_()
            for _ in range(STEPS):
                logits, cache = model(*EXAMPLE)
                model.cache.copy_(cache)
                out.append(logits.tolist())
        for name, p in model.named_parameters():
            p.mul_(2)
        out.append(model(*EXAMPLE)[0].tolist())
    return out


def run_rank(path: str, rank: int, port: int, out_dir: str) -> None:
    """One rank process: trace, decode, export, load, decode, replace_weights, decode; writes what it saw."""
    import cloudpickle
    import torch.distributed as dist

    from cluster.generation.plan import Forward
    from cluster.parallel_layers import collectives
    from cluster.rank import RankWorker
    from cluster.signature import signature_of
    from cluster.trace.config import TraceSpec
    from tests.unit import neuron_standins as standins

    standins.install(path)
    if path == "xla":
        hide_what_torch_2_9_lacks()
    phase = {"now": "setup"}
    cpu_collectives: list[tuple[str, str]] = []
    real_gather = collectives.process_gather
    collectives.process_gather = lambda: (cpu_collectives.append((phase["now"], "tpcluster::all_gather")), real_gather())[1]
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter", "barrier"):
        original = getattr(dist, name)
        setattr(dist, name, lambda *a, _n=name, _f=original, **k: (cpu_collectives.append((phase["now"], _n)), _f(*a, **k))[1])
    if path == "native":
        from cluster.trace.neuron import NativeNeuronBackend

        NativeNeuronBackend.device = "cpu"  # a stand-in cannot create a `neuron` device; everything else is real

    def mark(name: str) -> None:
        phase["now"] = name
        standins.record(f"phase:{name}")

    worker = RankWorker(rank, WORLD, node="127.0.0.1")
    worker.init_collectives("127.0.0.1", port, 30.0, 1)
    spec = TraceSpec(func_blob=cloudpickle.dumps(build_model), tp_degree=WORLD, backend="neuron", inline_weights=False,
                     bucket_signatures=(signature_of(EXAMPLE),), compiler_workdir=str(Path(out_dir) / "work"),
                     compiler_args=["--model-type=transformer"])
    mark("build")
    worker.build(spec)
    mark("trace")
    _, blob = worker.trace_bucket(0, EXAMPLE, return_graph=True)
    outputs = []
    mark("decode")
    for _ in range(STEPS):
        outputs.append(worker.run(Forward(0, EXAMPLE)))
    mark("export")
    exported = worker.export()
    weights = {k: v.clone() for k, v in exported.weights.items()}
    weights["cache"].zero_()
    mark("load")
    loaded = RankWorker(rank, WORLD, node="127.0.0.1")
    loaded.load("neuron", exported.graphs, weights, 1, {"cache": 1})
    mark("decode-loaded")
    for _ in range(STEPS):
        outputs.append(loaded.run(Forward(0, EXAMPLE)))
    mark("replace")
    loaded.replace_weights({k: v * 2 for k, v in weights.items() if k != "cache"})
    mark("decode-replaced")
    outputs.append(loaded.run(Forward(0, EXAMPLE)))
    group = getattr(collectives_of_rank(), "group", None)
    result = {
        "record": standins.RECORD,
        "outputs": [o[0].tolist() if o is not None else None for o in outputs],
        "cpu_collectives": cpu_collectives,
        "graph": graph_text(path, blob),
        "graph_is_same_on_save": exported.graphs[0] == blob,
        "neuron_group_name": group.group_name if group is not None else None,
        "default_group_backend": dist.get_backend(),
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result, default=str))


def hide_what_torch_2_9_lacks() -> None:
    """Make this process's torch fail on the torch.export APIs that the cpu backend uses and torch 2.9 lacks.

    The xla path runs on the Neuron SDK's torch (torch-neuronx 2.9: torch 2.9, deploy/neuron-constraints.txt),
    while this suite runs on torch 2.13; with these gone, the xla contract shows that path never reaches them.
    """
    from torch._export.serde import serialize as serde
    from torch.utils._pytree import TreeSpec

    def gone(name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"{name} used on the xla path: torch 2.9 has none")
        return fail

    TreeSpec.child = gone("TreeSpec.child")
    serde._resolve_schema_cls = gone("torch._export.serde.serialize._resolve_schema_cls")
    serde.serialize = gone("torch._export.serde.serialize.serialize(serialize_state_dict=...)")


def collectives_of_rank() -> Any:
    from cluster.parallel_layers import parallel_state

    return parallel_state.get_collectives()


def graph_text(path: str, blob: bytes) -> str:
    """What the saved graph file says it runs: TorchScript IR (xla path) or the exported program (native)."""
    if path == "xla":
        import io

        return str(torch.jit.load(io.BytesIO(blob)).inlined_graph)
    from cluster.trace.cpu import _PROGRAM_KEY, _safetensors_metadata

    return _safetensors_metadata(blob)[_PROGRAM_KEY]


def run_path(path: str, tmp_path: Path) -> list[dict[str, Any]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=run_rank, args=(path, r, port, str(tmp_path))) for r in range(WORLD)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    assert [p.exitcode for p in procs] == [0] * WORLD, "a rank process failed; run run_rank by hand to see its traceback"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def calls(result: dict, *, phase: str | None = None) -> list[str]:
    names, now = [], None
    for entry in result["record"]:
        if entry["call"].startswith("phase:"):
            now = entry["call"].removeprefix("phase:")
        elif phase is None or now == phase:
            names.append(entry["call"])
    return names


def first(result: dict, call: str) -> dict:
    return next(e for e in result["record"] if e["call"] == call)


@pytest.fixture(scope="module")
def xla(tmp_path_factory) -> list[dict[str, Any]]:
    return run_path("xla", tmp_path_factory.mktemp("xla"))


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> list[dict[str, Any]]:
    return run_path("native", tmp_path_factory.mktemp("native"))


def check_outputs(results: list[dict]) -> None:
    expected = expected_outputs()
    got = results[0]["outputs"]
    assert len(got) == len(expected) == 2 * STEPS + 1
    for step, (g, e) in enumerate(zip(got, expected)):
        assert torch.allclose(torch.tensor(g), torch.tensor(e), atol=1e-5), f"step {step}"
    assert results[1]["outputs"] == [None] * len(expected)  # only rank 0 returns outputs
    # the decode steps read the state: consecutive steps differ, and the reload starts over
    assert got[0] != got[1] and torch.allclose(torch.tensor(got[0]), torch.tensor(got[2]), atol=1e-6)


def check_no_cpu_collectives(results: list[dict]) -> None:
    for result in results:
        inside = [c for c in result["cpu_collectives"] if c[0] not in ("setup",)]
        assert inside == [], f"CPU collectives ran while the neuron backend traced or served: {inside}"


@pytest.mark.slow
def test_contract_xla_path_trace_decode_save_load_replace(xla):
    """Contract (inf2/trn1, torch-neuronx over torch-xla): values, call order, arguments and environment per rank."""
    check_outputs(xla)
    check_no_cpu_collectives(xla)
    for rank, result in enumerate(xla):
        env = first(result, "torch_neuronx.trace")["env"]
        assert env["PJRT_DEVICE"] == "NEURON" and env["RANK"] == str(rank) and env["WORLD_SIZE"] == "2"
        assert env["NEURON_PJRT_PROCESS_INDEX"] == str(rank) and env["NEURON_PJRT_PROCESSES_NUM_DEVICES"] == "1,1"
        assert env["NEURON_RT_ROOT_COMM_ID"] == xla[0]["record"][-1]["env"]["NEURON_RT_ROOT_COMM_ID"]
        assert env["NEURON_RT_ROOT_COMM_ID"].startswith("127.0.0.1:")
        trace = first(result, "torch_neuronx.trace")
        assert trace["inline_weights_to_neff"] is False and trace["compiler_args"] == ["--model-type=transformer"]
        assert trace["compiler_workdir"].endswith(f"rank_{rank:02d}/bucket_00")
        assert first(result, "xm.all_reduce")["groups"] == [[0, 1]]
        assert first(result, "xm.all_gather")["groups"] == [[0, 1]] and first(result, "xm.all_gather")["dim"] == 1
        # traced, then loaded as a saved graph is (not onto the core), then bound: weights, collectives, core
        assert calls(result, phase="trace")[:4] == ["torch_neuronx.trace", "xm.all_reduce", "neff.all_reduce", "xm.all_gather"]
        assert "torch_neuronx.contexts.disable_nrt_load" in calls(result, phase="trace")
        for phase in ("decode", "decode-loaded"):
            sequence = [c for c in calls(result, phase=phase) if not c.startswith("neff.")]
            assert sequence[:3] == ["torch_neuronx.replace_weights", "torch.ops.neuron._load_collectives_neuron",
                                    "torch_neuronx.move_trace_to_device"]
            # the next step's state reaches the NEFF: weights swapped in again, not a second collectives load
            assert sequence[3:] == ["torch_neuronx.replace_weights", "torch_neuronx.move_trace_to_device"]
        assert first(result, "torch.ops.neuron._load_collectives_neuron")["args"] == [0, 1, rank, 2]
        assert calls(result, phase="decode-replaced")[:2] == ["torch_neuronx.replace_weights",
                                                              "torch_neuronx.move_trace_to_device"]
        # the graph file holds the Neuron collectives and no CPU one
        assert "standin_neuron::all_reduce" in result["graph"] and "standin_neuron::all_gather" in result["graph"]
        assert "tpcluster::all_gather" not in result["graph"] and "c10d" not in result["graph"]
        assert result["graph_is_same_on_save"]


@pytest.mark.slow
def test_contract_native_path_trace_decode_save_load_replace(native):
    """Contract (trn2/trn3, native TorchNeuron): the `neuron` process group, functional collectives, torch.compile."""
    check_outputs(native)
    check_no_cpu_collectives(native)
    for rank, result in enumerate(native):
        group = first(result, "dist.new_group(backend='neuron')")
        assert (group["rank"], group["size"]) == (rank, 2)
        assert group["env"]["NEURON_RT_ROOT_COMM_ID"] == native[0]["record"][-1]["env"]["NEURON_RT_ROOT_COMM_ID"]
        assert group["env"]["PJRT_DEVICE"] is None  # no PJRT on the native path
        assert calls(result, phase="build")[0] == "dist.new_group(backend='neuron')"
        assert "torch_neuronx.trace" not in calls(result)
        assert first(result, "torch.compile")["backend"] == "neuron"
        # one compile per graph bound: the traced one and the loaded one; replace_weights does not recompile
        assert calls(result).count("torch.compile") == 2 and "torch.compile" not in calls(result, phase="replace")
        # the exported program's collectives are functional collectives on the neuron group, not on gloo ("0")
        assert "_c10d_functional.all_reduce" in result["graph"] and "_c10d_functional.all_gather_into_tensor" in result["graph"]
        assert "tpcluster.all_gather" not in result["graph"]
        assert f'"{result["neuron_group_name"]}"' in result["graph"] and result["neuron_group_name"] != "0"
        assert result["default_group_backend"] == "gloo"  # the control plane only


def test_neuron_path_is_chosen_from_what_is_installed():
    """Contract: torch-neuronx with torch-xla is the inf2/trn1 path; without torch-xla, native TorchNeuron."""
    from cluster.trace.neuron import neuron_path

    assert neuron_path(lambda n: n in {"torch_neuronx", "torch_xla"}) == "xla"
    assert neuron_path(lambda n: n == "torch_neuronx") == "native"
    assert neuron_path(lambda n: n == "torch_xla") is None


def test_runtime_environment_per_path():
    from cluster.trace.neuron import runtime_environment

    xla = runtime_environment(1, 4, "10.0.0.5:41000", "xla")
    assert xla == {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                   "NEURON_RT_ROOT_COMM_ID": "10.0.0.5:41000", "PJRT_DEVICE": "NEURON",
                   "NEURON_PJRT_PROCESS_INDEX": "1", "NEURON_PJRT_PROCESSES_NUM_DEVICES": "1,1,1,1"}
    native = runtime_environment(0, 2, "h:1", "native")
    assert "PJRT_DEVICE" not in native and native["NEURON_RT_ROOT_COMM_ID"] == "h:1"
    assert "NEURON_RT_ROOT_COMM_ID" not in runtime_environment(0, 1, "", "xla")


def test_without_torch_2_13s_export_api_cpu_and_native_refuse_and_xla_goes_on(monkeypatch):
    """On torch 2.9 (the Neuron SDK's torch for inf2/trn1) the cpu backend and the native path say which torch they
    need, before any rank runs; the xla path is built (its contract above runs with those APIs taken away)."""
    from cluster.errors import BackendUnavailable
    from cluster.trace import backends, cpu, neuron

    monkeypatch.setattr(cpu, "missing_export_support", lambda: ("torch.utils._pytree.TreeSpec.child",))
    monkeypatch.setattr(torch, "__version__", "2.9.1")
    for call in (lambda: backends.resolve_backend("cpu"), lambda: backends.get_backend("cpu")):
        with pytest.raises(BackendUnavailable, match=r"backend 'cpu' needs torch 2\.13.*torch 2\.9\.1.*TreeSpec\.child"):
            call()
    sdk = types.SimpleNamespace(find_spec=lambda name: object() if name == "torch_neuronx" else None)
    monkeypatch.setattr(backends, "importlib", types.SimpleNamespace(util=sdk))
    assert backends.resolve_backend("auto") == "neuron"  # auto never picks the cpu backend where torch-neuronx is
    monkeypatch.setattr(neuron, "neuron_path", lambda installed=None: "native")
    with pytest.raises(BackendUnavailable, match=r"native \(TorchNeuron\) path needs torch 2\.13"):
        neuron.NeuronBackend()
    monkeypatch.setattr(neuron, "neuron_path", lambda installed=None: "xla")
    assert isinstance(neuron.NeuronBackend(), neuron.XlaNeuronBackend)


def test_this_torch_has_the_export_api_the_cpu_backend_needs():
    from cluster.trace.cpu import missing_export_support

    assert missing_export_support() == ()


def test_neuron_backend_without_the_sdk_says_what_to_do():
    from cluster.errors import BackendUnavailable
    from cluster.trace.backends import get_backend, resolve_backend

    with pytest.raises(BackendUnavailable, match="torch-neuronx.*doctor"):
        resolve_backend("neuron")
    with pytest.raises(BackendUnavailable, match="torch-neuronx"):
        get_backend("neuron")
