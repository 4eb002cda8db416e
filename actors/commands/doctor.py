"""`tpcluster doctor`: which backend this machine would use and why, and checks that it works.

Each check runs two real rank processes (`cluster.rank.RankWorker`, as Ray rank actors run it, without
Ray so it answers in seconds): a collective between them, and a TP=2 trace of a tiny
column -> row -> column model checked against the whole model run eagerly. Where Neuron is installed
the same runs use the neuron backend, one NeuronCore per rank (NEURON_RT_VISIBLE_CORES, as Ray
assigns it), and the model's outputs are compared with the cpu backend's. Where it is not, the
report says so and what ran instead.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import queue as queue_module
import socket
import time
from typing import Any

WORLD = 2
CPU_TOLERANCE = 1e-5
NEURON_TOLERANCE = 2e-2  # neuronx-cc casts fp32 matrix products to bf16 by default (--auto-cast matmult)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds each check may take (Neuron compilation takes minutes; cpu takes seconds)")


def environment() -> dict[str, Any]:
    """What is installed and visible: the backend `auto` picks, the Neuron path, devices, and why."""
    import importlib.util

    from cluster.trace.neuron import neuron_path

    path = neuron_path()
    devices = sorted(glob.glob("/dev/neuron[0-9]*"))
    versions = {}
    for package in ("torch", "torch_neuronx", "torch_xla", "neuronxcc"):
        if importlib.util.find_spec(package) is not None:
            try:
                versions[package] = getattr(__import__(package), "__version__", "installed")
            except Exception as exc:  # noqa: BLE001 - a broken install is what this command reports
                versions[package] = f"import failed: {exc}"
    if path is None:
        reason = ("torch-neuronx is not installed, so `auto` picks the cpu backend"
                  + (f"; {len(devices)} Neuron device(s) are present: install the Neuron SDK" if devices else
                     "; no Neuron device (/dev/neuron*) is present either"))
    else:
        family = "inf2/trn1 (torch-neuronx over torch-xla)" if path == "xla" else "trn2/trn3 (native TorchNeuron)"
        reason = f"torch-neuronx is installed, so `auto` picks the neuron backend on the {family} path"
    return {"backend": "neuron" if path else "cpu", "neuron_path": path, "reason": reason, "devices": devices,
            "visible_cores": os.environ.get("NEURON_RT_VISIBLE_CORES"), "versions": versions}


# -- what the rank processes run ----------------------------------------------------------------
def _full_state() -> dict:
    import torch

    generator = torch.Generator().manual_seed(17)
    shapes = {"up.weight": (32, 16), "up.bias": (32,), "down.weight": (16, 32), "down.bias": (16,),
              "head.weight": (8, 16), "head.bias": (8,)}
    return {k: torch.randn(*s, generator=generator) * 0.2 for k, s in shapes.items()}


def _tiny_model() -> tuple[Any, dict]:
    """Column (sharded out) -> row (all-reduce) -> column (all-gather): every collective the layers use."""
    import torch

    from cluster.parallel_layers import parallel_state
    from cluster.parallel_layers.layers import ColumnParallelLinear, RowParallelLinear
    from cluster.parallel_layers.sharding import partition_dims, split_state_dict

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = ColumnParallelLinear(16, 32, gather_output=False)
            self.down = RowParallelLinear(32, 16, input_is_parallel=True)
            self.head = ColumnParallelLinear(16, 8, gather_output=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.down(torch.relu(self.up(x)))))

    model = Tiny()
    rank, world = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_size()
    model.load_state_dict(split_state_dict(_full_state(), partition_dims(model), rank, world))
    return model, {}


def _rank_sum() -> tuple[Any, dict]:
    """all_reduce(x * (rank + 1)): across two ranks, 3x."""
    import torch

    from cluster.parallel_layers import parallel_state

    class RankSum(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.tensor(float(parallel_state.get_tensor_model_parallel_rank() + 1)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return parallel_state.get_collectives().all_reduce(x * self.scale)

    return RankSum(), {}


def _example() -> tuple:
    import torch

    return (torch.linspace(-2, 2, 48).reshape(3, 16),)


def _rank_main(backend: str, rank: int, port: int, queue: Any) -> None:
    try:
        import cloudpickle
        import torch

        from cluster.generation.plan import Forward
        from cluster.rank import RankWorker
        from cluster.signature import signature_of
        from cluster.trace.config import TraceSpec

        worker = RankWorker(rank, WORLD, node="127.0.0.1")
        worker.init_collectives("127.0.0.1", port, 60.0, 1)
        results = {}
        for name, func, example in (("collective", _rank_sum, (torch.ones(4),)), ("model", _tiny_model, _example())):
            spec = TraceSpec(func_blob=cloudpickle.dumps(func), tp_degree=WORLD, backend=backend, inline_weights=False,
                             bucket_signatures=(signature_of(example),), spmd_mode=False)
            worker.build(spec)
            worker.trace_bucket(0, example, return_graph=False)
            out = worker.run(Forward(0, example))
            results[name] = out.tolist() if out is not None else None
        queue.put((rank, "ok", results))
    except BaseException as exc:  # noqa: BLE001 - reported in the table, not as a child's traceback
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}"))


def run_ranks(backend: str, timeout: float) -> dict[str, Any]:
    """Two rank processes trace and run the collective and the tiny model on `backend`; rank 0's outputs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = []
    for rank in range(WORLD):
        if backend == "neuron":  # one NeuronCore per rank, as Ray's neuron_cores assignment gives it
            os.environ["NEURON_RT_VISIBLE_CORES"] = str(rank)
        procs.append(context.Process(target=_rank_main, args=(backend, rank, port, queue), daemon=True))
        procs[-1].start()
    answers: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(answers) < WORLD and time.monotonic() < deadline:
            try:
                rank, status, value = queue.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
                answers[rank] = (status, value)
            except queue_module.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
    finally:
        for proc in procs:
            proc.join(1)
            if proc.is_alive():
                proc.kill()
    errors = [f"rank {r}: {v}" for r, (s, v) in sorted(answers.items()) if s != "ok"]
    if len(answers) < WORLD:
        errors.append(f"ranks {sorted(set(range(WORLD)) - set(answers))} did not answer within {timeout:.0f} s")
    return {"error": "; ".join(errors)} if errors else answers[0][1]


def _max_diff(a: Any, b: Any) -> float:
    import torch

    return float((torch.tensor(a) - torch.tensor(b)).abs().max())


def eager_reference() -> list:
    import torch

    model, _ = _tiny_model()  # this process is a single rank: the whole model
    with torch.no_grad():
        return model(*_example()).tolist()


def diagnose(timeout: float) -> dict[str, Any]:
    """The report: environment, and each check as {"name", "status": pass|fail|skip, "detail"}."""
    started = time.perf_counter()
    env = environment()
    checks: list[dict[str, str]] = []

    def check(name: str, ok: bool | None, detail: str) -> None:
        checks.append({"name": name, "status": "skip" if ok is None else ("pass" if ok else "fail"), "detail": detail})

    neuron = env["neuron_path"] is not None
    check("backend", True, f"{env['backend']}: {env['reason']}")
    if neuron:
        check("neuron devices", bool(env["devices"]),
              f"{len(env['devices'])} Neuron device(s): {', '.join(env['devices']) or 'none'}"
              + ("" if env["devices"] else "; torch-neuronx is installed but no device is visible (driver loaded? in a container, pass /dev/neuron*)"))
    else:
        check("neuron devices", None, "no Neuron device or SDK here: checked the cpu backend instead (below)")
    from cluster.trace.cpu import TESTED_EXPORT_TORCH, missing_export_support

    reference = eager_reference()
    missing = missing_export_support()
    if missing:  # e.g. the inf2/trn1 image: the Neuron SDK's torch 2.9 runs the xla path, not the cpu backend
        import torch

        why = (f"the cpu backend needs torch {TESTED_EXPORT_TORCH}'s torch.export API; torch {torch.__version__} "
               f"lacks {', '.join(missing)}")
        cpu: dict[str, Any] = {"unsupported": why}
        check("cpu: collective across 2 rank processes", None, why)
        check("cpu: TP=2 trace of a tiny model vs the whole model", None, why)
    elif "error" in (cpu := run_ranks("cpu", timeout)):
        check("cpu: collective across 2 rank processes", False, cpu["error"])
        check("cpu: TP=2 trace of a tiny model vs the whole model", False, cpu["error"])
    else:
        summed = cpu["collective"]
        check("cpu: collective across 2 rank processes", summed == [3.0] * 4,
              f"all_reduce of 1 x (rank + 1) over gloo / shared memory gave {summed}, expected [3.0] * 4")
        diff = _max_diff(cpu["model"], reference)
        check("cpu: TP=2 trace of a tiny model vs the whole model", diff <= CPU_TOLERANCE,
              f"torch.export shards, max |diff| {diff:.2e} (tolerance {CPU_TOLERANCE:g})")
    if neuron:
        if not env["devices"]:
            check("neuron: collective across 2 NeuronCores", None, "no Neuron device visible")
            check("neuron: TP=2 trace vs the cpu backend", None, "no Neuron device visible")
        else:
            result = run_ranks("neuron", timeout)
            if "error" in result:
                check("neuron: collective across 2 NeuronCores", False, result["error"])
                check("neuron: TP=2 trace vs the cpu backend", False, result["error"])
            else:
                summed = result["collective"]
                check("neuron: collective across 2 NeuronCores", _max_diff(summed, [3.0] * 4) <= 1e-3,
                      f"all_reduce compiled into the NEFF, cores 0 and 1: {summed}, expected [3.0] * 4")
                if "unsupported" in cpu:  # no cpu backend to compare with: the whole model, eager, instead
                    diff, against = _max_diff(result["model"], reference), " vs the whole model, eager"
                else:
                    diff = _max_diff(result["model"], cpu["model"]) if "error" not in cpu else float("inf")
                    against = ""
                check("neuron: TP=2 trace vs the cpu backend", diff <= NEURON_TOLERANCE,
                      f"{env['neuron_path']} path{against}, max |diff| {diff:.2e} (tolerance {NEURON_TOLERANCE:g}, "
                      "bf16 matmults)")
    return {**env, "hardware_checked": neuron and bool(env["devices"]), "checks": checks,
            "ok": all(c["status"] != "fail" for c in checks), "seconds": round(time.perf_counter() - started, 1)}


def format_table(report: dict[str, Any]) -> str:
    width = max(len(c["name"]) for c in report["checks"])
    lines = [f"{c['status'].upper():5} {c['name']:<{width}}  {c['detail']}" for c in report["checks"]]
    if not report["hardware_checked"]:
        lines.append("No Neuron hardware was checked on this machine: the results above are for the cpu backend.")
    lines.append(f"{'all checks passed' if report['ok'] else 'SOME CHECKS FAILED'} ({report['seconds']} s)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = diagnose(args.timeout)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0 if report["ok"] else 1
