"""Rank graphs compiled to machine code (AOTInductor) on the cpu backend.

A cpu rank runs its bucket graphs op by op through torch.export's interpreter (~600 Python op calls
a decode step of the shipped target). `compile_package` compiles one bucket's serving graph (the
graph a rank runs: `cluster.trace.cpu._serving_module`, KV-cache writes in place) into an
AOTInductor package, a shared library that takes the rank's weights and the bucket's inputs and
writes the state (io_aliases) in place; `CompiledCall` runs it where the interpreted graph ran,
with the same outputs (state outputs as views of the state, so the rank copies nothing).

Measured here (shipped target, TP=1, 1 thread, one decode step): 2.5-3.5 ms interpreted vs
1.3-1.7 ms compiled at batch 1; at batch 8 with a 512-token cache, 6-25 ms (bimodal: the
interpreter's KV expansions allocate ~100 MB a step) vs 5-7 ms. Logits agree to < 1e-5, caches
after two steps to < 5e-6. At TP=2 the collective custom op runs as an opaque call into its Python
kernel. A graph takes 9-25 s to compile and needs a C++ compiler (g++); loading a package needs
none.

Packages are cached under TPCLUSTER_CACHE (else ~/.cache/tpcluster) in `graphs/<machine>/`, keyed by
the graph file's bytes, which of its outputs are state and the rank's thread count (compiled in:
the kernels' parallel loops follow it); `<machine>` is torch's version, the CPU (its model and
flags: the code is built for this CPU, `-march=native`) and the compiler. The weights stay inputs,
so every rank of a replica (and every replica on a node) uses one package per graph, and a package
holds no weights (~2.6 MB). Ranks of a node that ask for the same package at once compile it once
(a file lock); a package that is not there is not made unless asked (`RankWorker.compile_graphs`),
and a rank without one runs the interpreted graph.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_unflatten

from cluster.errors import ClusterError


def cache_root() -> Path:
    return Path(os.environ.get("TPCLUSTER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tpcluster"))


@functools.cache
def machine_key() -> str:
    """What a package is built for besides its graph: torch, the CPU model and flags, the compiler."""
    cpu = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = "|".join(next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags"))
    compiler = ""
    if shutil.which("g++"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            compiler = subprocess.run(["g++", "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    text = f"{torch.__version__}|{platform.machine()}|{cpu or platform.processor()}|{compiler}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def package_path(graph_file: bytes, state: dict[int, int], threads: int) -> Path:
    """Where the package of a graph (its file's bytes), run with `state` (input position of a state
    weight -> its output index) on `threads` threads, is kept on this machine."""
    digest = hashlib.sha256(graph_file)
    digest.update(repr((sorted(state.items()), threads)).encode())
    return cache_root() / "graphs" / machine_key() / f"{digest.hexdigest()[:32]}.pt2"


def compiler_missing() -> str:
    """Why graphs cannot be compiled here ("" when they can)."""
    return "" if shutil.which("g++") else "no C++ compiler (g++) on this machine: install g++ (build-essential) to compile rank graphs"


class _KeptOutputs(nn.Module):
    """The serving graph with flat arguments, returning only the outputs not written in place."""

    def __init__(self, module: torch.fx.GraphModule, keep: list[int]) -> None:
        super().__init__()
        self.module, self.keep = module, keep

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.module(*args)
        return tuple(outputs[i] for i in self.keep)


def _outputs(module: torch.fx.GraphModule) -> tuple[Any, ...]:
    """The serving graph's output nodes."""
    return next(node for node in module.graph.nodes if node.op == "output").args[0]


def _in_place(module: torch.fx.GraphModule, state: dict[int, int]) -> dict[int, int]:
    """The state outputs the serving graph writes in place: output index -> the state's input position."""
    outputs = _outputs(module)
    return {index: position for position, index in state.items()
            if index < len(outputs) and getattr(outputs[index], "target", None) is torch.ops.aten.scatter_.src}


def _example_inputs(module: torch.fx.GraphModule, weight_count: int) -> tuple[torch.Tensor, ...]:
    """Zeros of the bucket's input shapes (the placeholders after the weights): the compiler traces shapes only."""
    placeholders = [node for node in module.graph.nodes if node.op == "placeholder"][weight_count:]
    return tuple(torch.zeros(node.meta["val"].shape, dtype=node.meta["val"].dtype) for node in placeholders)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def compile_package(module: torch.fx.GraphModule, weights: list[torch.Tensor], state: dict[int, int],
                    threads: int, path: Path) -> bool:
    """Make the package of a serving graph (`cluster.trace.cpu._serving_module`'s) at `path` unless it
    is there (one rank of a node compiles, the others wait); True when this call compiled it."""
    from torch._inductor import aoti_compile_and_package, config

    missing = compiler_missing()
    if missing:
        raise ClusterError(missing)
    with _locked(path):
        if path.exists():
            return False
        outputs = len(_outputs(module))
        keep = [i for i in range(outputs) if i not in _in_place(module, state)]
        with torch.no_grad():
            exported = torch.export.export(_KeptOutputs(module, keep), (*weights, *_example_inputs(module, len(weights))))
        partial = path.with_suffix(f".{os.getpid()}.partial.pt2")
        with config.patch({"cpp.threads": max(1, threads)}):
            aoti_compile_and_package(exported, package_path=str(partial))
        os.replace(partial, path)
        return True


class CompiledCall:
    """A compiled bucket graph called as the interpreted one (`cluster.trace.cpu._FlatCall`): the same
    outputs, its in-place state outputs given as views of the state's leading rows."""

    def __init__(self, path: Path, module: torch.fx.GraphModule, out_spec: Any, weights: list[torch.Tensor],
                 state: dict[int, int]) -> None:
        from torch._inductor import aoti_load_package

        outputs = _outputs(module)
        self._views = {index: (weights[position], outputs[index].meta["val"].shape[0])
                       for index, position in _in_place(module, state).items()}
        self._keep = [i for i in range(len(outputs)) if i not in self._views]
        self._count = len(outputs)
        self._out_spec = out_spec
        self._weights = weights
        self._runner = aoti_load_package(str(path))
        self.path = path

    def __call__(self, *inputs: torch.Tensor) -> Any:
        kept = self._runner(*self._weights, *inputs)
        if isinstance(kept, torch.Tensor):
            kept = [kept]
        flat: list[Any] = [None] * self._count
        for index, value in zip(self._keep, kept):
            flat[index] = value
        for index, (weight, rows) in self._views.items():
            flat[index] = weight.narrow(0, 0, rows)
        return tree_unflatten(flat, self._out_spec)


__all__ = ["CompiledCall", "cache_root", "compile_package", "compiler_missing", "machine_key", "package_path"]
