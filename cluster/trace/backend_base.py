"""The tracing backend interface: what a rank asks of a backend (trace its module, its graph to
bytes and back, bind weights), and what the backend says of itself (shares graphs, loads lazily,
keeps the surviving ranks).

The backends: `cpu` and `eager` in `cluster.trace.cpu`, `neuron` in `cluster.trace.neuron`; which
one a name stands for on this machine, and a fresh one for a rank, in `cluster.trace.backends`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class Backend:
    name = "base"
    #: a graph traced on one rank may run on every rank with that rank's weights
    shares_graphs = False
    #: a rank loading a saved model may deserialize each graph on its bucket's first run (RankWorker.load)
    loads_lazily = False
    #: when a rank's process dies, the others may keep their processes and shards and form a new group
    #: with its replacement (RankWorker.init_collectives again); else the replica is rebuilt whole
    keeps_survivors = False

    def trace(self, model: nn.Module, example: tuple[torch.Tensor, ...], weights: dict[str, torch.Tensor] | None,
              compiler_workdir: str | None = None, compiler_args: Any = None) -> Any:
        raise NotImplementedError

    def dump(self, graph: Any) -> bytes:
        raise NotImplementedError

    def load(self, blob: bytes, source: str) -> Any:
        raise NotImplementedError

    def bind(self, graph: Any, weights: dict[str, torch.Tensor] | None,
             state: dict[str, int] | None = None) -> Callable[..., Any]:
        """`graph` as a callable over `weights`. `state` (io_aliases: weight name -> output index) says which
        outputs are new values of which weights; a backend may write those in place (the rank then copies nothing)."""
        raise NotImplementedError

    def compiled(self, call: Callable[..., Any], graph_file: bytes | None, threads: int, build: bool = False) -> Callable[..., Any]:
        """A bound graph (`bind`'s) as machine code where the backend compiles graphs after binding
        (cpu: an AOTInductor package, cluster.trace.compiled) and one is cached for it, or `build`
        (made now); else `call` itself."""
        return call

    def prepare_rank(self, rank: int, world_size: int, node: str) -> None:
        """Set up this rank process for the backend before its model is built or loaded (cpu, eager: nothing)."""


__all__ = ["Backend"]
