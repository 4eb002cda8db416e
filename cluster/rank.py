"""One tensor-parallel rank: builds its model, traces and holds its shard, runs it.

A plain class with no Ray in it: `actors.rank_actor` wraps it as a Ray actor pinned to one
NeuronCore, and `cluster.rank_group.InProcessRankGroup` runs several in threads for tests.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import cloudpickle
import torch

from cluster.errors import ClusterError, InputError
from cluster.parallel_layers import parallel_state
from cluster.parallel_layers.collectives import (
    Collectives,
    GlooGather,
    ProcessGroupCollectives,
    collective_time,
    use_gather,
)
from cluster.parallel_layers.shared_memory import SharedMemoryGroup, form_shared_memory_group
from cluster.parallel_layers.sharding import partition_dims
from cluster.trace.backend_base import Backend
from cluster.trace.artifact import WeightFile, load_weights, tensor_digest, write_graph_file, write_weight_file
from cluster.trace.backends import get_backend
from cluster.trace.config import TraceSpec

if TYPE_CHECKING:
    from cluster.generation.plan import Call


def _held(weights: dict[str, torch.Tensor] | Sequence[WeightFile] | None) -> dict[str, torch.Tensor] | None:
    """The tensors a rank holds for `weights`: as given, or its files opened (checked and mapped)."""
    if weights is None or isinstance(weights, dict):
        return weights
    return load_weights(weights)


@dataclass
class RankExport:
    """What a rank hands over for saving: one graph file per bucket, and its separated weights."""

    graphs: list[bytes]
    weights: dict[str, torch.Tensor] | None


def collect_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer a forward reads, by name (tied parameters once)."""
    weights = {name: p.detach() for name, p in model.named_parameters()}
    weights.update({name: b.detach() for name, b in model.named_buffers()})
    return weights


@dataclass
class _DraftShard:
    """A fused draft on this rank: the whole (TP=1) draft model, its graphs bound to its weights."""

    calls: list[Any]  # None until the bucket is first run (see RankWorker._bound)
    weights: dict[str, torch.Tensor] | None
    aliases: dict[str, int]
    blobs: list[bytes]


class RankWorker:
    def __init__(self, rank: int, world_size: int, collectives: Collectives | None = None, node: str = "") -> None:
        self.rank = rank
        self.node = node or socket.gethostname()
        self.world_size = world_size
        self._collectives = collectives
        self._backend: Backend | None = None
        self._model: torch.nn.Module | None = None
        self._weights: dict[str, torch.Tensor] | None = None
        self._graphs: list[Any] = []  # backend graph objects, one per bucket
        self._aliases: dict[str, int] = {}  # state weight name -> output index (io_aliases)
        self._blobs: list[bytes | None] = []  # graph files as traced, adopted or loaded
        self._calls: list[Any] = []  # the same, bound to the weights
        self._draft: _DraftShard | None = None  # a draft replicated on every rank (fused speculation)
        self._shared_memory: SharedMemoryGroup | None = None
        self._run_s, self._runs = 0.0, 0  # graph calls: seconds and count (the benchmark's breakdown)
        self._threads = 0  # torch threads asked for; 0: as the process starts
        self._compiled = False  # bind graphs to their compiled packages (compile_graphs)
        if collectives is not None:  # an in-process rank: its thread is its process
            parallel_state.set_thread_rank(rank, world_size, collectives)
        elif world_size == 1:
            parallel_state.set_rank(0, 1, None)

    # -- collective group -------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "node": self.node,
            "neuron_cores": os.environ.get("NEURON_RT_VISIBLE_CORES", ""),
            "threads": torch.get_num_threads(),
            "collectives": self.collective_transport(),
            "backend": self._backend.name if self._backend is not None else "",
            "memory_bytes": _resident_bytes(),
        }

    @staticmethod
    def pick_rendezvous(host: str) -> tuple[str, int]:
        """A free TCP port on `host` for the group's rendezvous (never a fixed port)."""
        with socket.socket() as sock:
            sock.bind((host, 0))
            return host, sock.getsockname()[1]

    def init_collectives(self, host: str, port: int, timeout_s: float, threads: int) -> None:
        """Join the gloo group of this TP group, and its shared-memory collectives when every rank can map
        one segment (one node); every wait in either is bounded by timeout_s."""
        import torch.distributed as dist

        if threads > 0:
            torch.set_num_threads(threads)
            self._threads = threads
        if self.world_size == 1:
            return
        if host.startswith("127."):
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # else gloo may resolve the host to the outer address
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group(
            "gloo", init_method=f"tcp://{host}:{port}", rank=self.rank, world_size=self.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        if self._shared_memory is not None:
            self._shared_memory.close()
        self._shared_memory = form_shared_memory_group(self.rank, self.world_size, timeout_s)
        use_gather(self._shared_memory or GlooGather(self.world_size))
        self._collectives = ProcessGroupCollectives()
        parallel_state.set_rank(self.rank, self.world_size, self._collectives)

    def collective_transport(self) -> str:
        """What carries this rank's collectives: "shared-memory", "gloo" or "" (TP=1, or in-process)."""
        if self._shared_memory is not None:
            return "shared-memory"
        return "gloo" if self.world_size > 1 and self._collectives is not None else ""

    # -- tracing ----------------------------------------------------------------------------
    def build(self, spec: TraceSpec) -> dict[str, Any]:
        """Run the user's function in this rank; describes the weights it holds.

        Returns {"weights": {name: (shape, dtype)}, "partition_dims": {key: dim}, "state_keys": [...]}.
        """
        if spec.cwd and os.path.isdir(spec.cwd):
            os.chdir(spec.cwd)  # relative paths in the user's function resolve as in the caller
        self._backend = get_backend(spec.backend)
        self._backend.prepare_rank(self.rank, self.world_size, self.node)  # neuron: its runtime env and collectives
        func = cloudpickle.loads(spec.func_blob)
        result = func()
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
            raise ClusterError(f"the model function must return (model, io_aliases), got {type(result).__name__}")
        model, io_aliases = result
        self._model = model.eval()
        self._weights = None if spec.inline_weights else collect_weights(model)
        self._aliases = self._alias_names(model, io_aliases or {}, spec.inline_weights)
        self._graphs, self._calls = [None] * len(spec.bucket_signatures), [None] * len(spec.bucket_signatures)
        self._blobs: list[bytes | None] = [None] * len(spec.bucket_signatures)
        self._compiler = (spec.compiler_workdir, spec.compiler_args)
        source = self._weights if self._weights is not None else collect_weights(model)
        return {
            "weights": {k: (tuple(v.shape), str(v.dtype)) for k, v in source.items()},
            "partition_dims": partition_dims(model),
            "state_keys": sorted(model.state_dict()),
            "io_aliases": self._aliases,
        }

    @staticmethod
    def _alias_names(model: torch.nn.Module, io_aliases: dict, inline: bool) -> dict[str, int]:
        """io_aliases {state tensor: output index} as {weight name: output index}."""
        if not io_aliases:
            return {}
        if inline:
            raise ClusterError("io_aliases (state tensors such as a KV cache) need inline_weights_to_neff=False")
        names = {id(t): n for n, t in list(model.named_buffers()) + list(model.named_parameters())}
        aliases = {}
        for tensor, index in io_aliases.items():
            if id(tensor) not in names:
                raise ClusterError("an io_aliases key is not a buffer or parameter of the model; register the state as a buffer")
            aliases[names[id(tensor)]] = int(index)
        return aliases

    def trace_bucket(self, bucket: int, example: tuple[torch.Tensor, ...], return_graph: bool) -> tuple[float, bytes | None]:
        """Trace this rank's shard for one bucket; returns seconds taken and, if asked, the graph file."""
        start = time.perf_counter()
        workdir, args = self._compiler
        if workdir:
            workdir = os.path.join(workdir, f"rank_{self.rank:02d}", f"bucket_{bucket:02d}")
        graph = self._backend.trace(self._model, example, self._weights, workdir, args)
        self._set_graph(bucket, graph)
        blob = self._backend.dump(graph) if return_graph else None
        self._blobs[bucket] = blob
        return time.perf_counter() - start, blob

    def adopt_graph(self, bucket: int, blob: bytes) -> float:
        """Use a graph traced on another rank, bound to this rank's weights."""
        start = time.perf_counter()
        self._blobs[bucket] = blob  # saved as received: byte-identical to rank 0's, so stored once
        self._set_graph(bucket, self._backend.load(blob, f"bucket {bucket} graph from rank 0"))
        return time.perf_counter() - start

    def compile_graphs(self, buckets: Sequence[int] | None = None) -> list[tuple[int, float, bool]]:
        """Compile each bucket graph (all, or `buckets`) to machine code where the backend does
        (cpu: cluster.trace.compiled; one compile per node, the other ranks wait for it and load
        it) and run it from now on; a graph bound later (loaded on first use, or a bucket not named)
        runs its package when one is cached. Per bucket: (bucket, seconds, whether this rank compiled it)."""
        self._compiled = True
        done = []
        for bucket in range(len(self._calls)) if buckets is None else buckets:
            started = time.perf_counter()
            self._bound(bucket)
            if self._blobs[bucket] is None:
                self._blobs[bucket] = self._backend.dump(self._graphs[bucket])
            before = self._calls[bucket]
            self._calls[bucket] = self._compiled_call(before, self._blobs[bucket], build=True)
            done.append((bucket, time.perf_counter() - started, self._calls[bucket] is not before))
        return done

    def _compiled_call(self, call: Any, graph_file: bytes | None, build: bool = False) -> Any:
        """A bound graph as its compiled package once `compile_graphs` was asked for (or `build`), else itself."""
        if not (self._compiled or build):
            return call
        return self._backend.compiled(call, graph_file, self._threads or torch.get_num_threads(), build)

    def verify_bucket(self, bucket: int, example: tuple[torch.Tensor, ...]) -> float:
        """Largest difference between the graph and the eager module on the example (all ranks run it)."""
        with torch.no_grad():
            expected = _flat(self._model(*example))
            got = _flat(self._bound(bucket)(*example))
        if len(expected) != len(got):
            return float("inf")
        return max((float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(expected, got)), default=0.0)

    def finish_trace(self) -> None:
        self._model = None  # the graphs (and separated weights) are all a rank keeps

    def _bound(self, bucket: int, draft: bool = False) -> Any:
        """Bucket `bucket`'s graph bound to the weights; a graph loaded from a folder is deserialized
        here, on its first run (see `load`)."""
        if draft:
            call = self._draft.calls[bucket]
            if call is None:
                blob = self._draft.blobs[bucket]
                graph = self._backend.load(blob, f"rank {self.rank} fused draft bucket {bucket} graph")
                call = self._compiled_call(self._backend.bind(graph, self._draft.weights, self._draft.aliases), blob)
                self._draft.calls[bucket] = call
            return call
        call = self._calls[bucket]
        if call is None:
            self._set_graph(bucket, self._backend.load(self._blobs[bucket], f"rank {self.rank} bucket {bucket} graph"))
            call = self._calls[bucket]
        return call

    def _set_graph(self, bucket: int, graph: Any) -> None:
        """Bind a bucket's graph: after `compile_graphs`, its compiled package when one is cached for it."""
        self._graphs[bucket] = graph
        call = self._backend.bind(graph, self._weights, self._aliases)
        self._calls[bucket] = self._compiled_call(call, self._blobs[bucket])

    # -- serving ----------------------------------------------------------------------------
    def _run(self, bucket: int, inputs: tuple[torch.Tensor, ...], draft: bool = False) -> Any:
        """Run one bucket's graph (of the fused draft with `draft`); state outputs (io_aliases)
        update the state and are not returned.

        A state output may hold only the leading rows of its state (a batch bucket smaller than the
        state's batch): it updates those rows.
        """
        if not self._calls:
            raise ClusterError("this rank holds no traced shard; trace or load the model first")
        if draft and self._draft is None:
            raise ClusterError("this rank holds no fused draft; load the target from a folder with one (cluster.trace.fuse_draft)")
        if self._threads and torch.get_num_threads() != self._threads:
            torch.set_num_threads(self._threads)  # per OS thread: a compiled graph runs steps on its own thread
        started = time.perf_counter()
        try:
            with torch.no_grad():
                if draft:
                    return self._run_graph(self._bound(bucket, True), self._draft.weights, self._draft.aliases, inputs)
                return self._run_graph(self._bound(bucket), self._weights, self._aliases, inputs)
        finally:
            self._run_s += time.perf_counter() - started
            self._runs += 1

    @staticmethod
    def _run_graph(call: Any, weights: dict[str, torch.Tensor] | None, aliases: dict[str, int],
                   inputs: tuple[torch.Tensor, ...]) -> Any:
        outputs = call(*inputs)
        if not aliases:
            return outputs
        for name, index in aliases.items():
            state, new = weights[name], outputs[index]
            if _leading_rows_of(new, state):
                continue  # written in place by the graph (cluster.trace.cpu._serving_module)
            if new.shape == state.shape:
                state.copy_(new)
            elif new.dim() == state.dim() and new.shape[1:] == state.shape[1:] and new.shape[0] <= state.shape[0]:
                state[: new.shape[0]].copy_(new)
            else:
                raise ClusterError(f"state output {index} has shape {tuple(new.shape)}; state {name!r} is "
                                   f"{tuple(state.shape)}: return the state, or its leading rows")
        kept = set(aliases.values())
        return tuple(o for i, o in enumerate(outputs) if i not in kept)

    def run(self, call: Call) -> Any:
        """One call of the serving path (a cluster.generation.plan type: one graph, several decode
        steps, a draft's proposals, a fused round), run by `cluster.generation.steps.execute` over
        this rank's graphs. Rank 0 returns the answer; the other ranks None."""
        from cluster.generation.steps import execute

        out = execute(call, self._run, self._gather, lambda: {name: self._weights[name] for name in self._aliases})
        return out if self.rank == 0 else None

    def _gather(self, proposals: torch.Tensor) -> torch.Tensor:
        """Rank 0's proposals on every rank (so all verify the same tokens whatever the arithmetic)."""
        if self.world_size > 1 and self._collectives is not None:
            return self._collectives.all_gather(proposals.unsqueeze(0).contiguous(), 0)[0]
        return proposals

    def _graph_blobs(self) -> list[bytes]:
        return [blob if blob is not None else self._backend.dump(graph) for blob, graph in zip(self._blobs, self._graphs)]

    def export(self) -> RankExport:
        return RankExport(self._graph_blobs(), self._weights)

    def shard_digests(self) -> dict[str, Any]:
        """What `artifact.plan_shards` needs to plan a save where every rank writes its own files:
        the sha256 of each bucket's graph file and a digest of each weight tensor."""
        return {"graphs": [hashlib.sha256(blob).hexdigest() for blob in self._graph_blobs()],
                "weights": None if self._weights is None else {k: tensor_digest(v) for k, v in self._weights.items()}}

    def write_shard(self, folder: str, writes: dict[int, str], shared: list[str], write_shared: bool) -> dict[str, dict[str, Any]]:
        """Write this rank's part of a saved model into `folder`: the graph files `writes` names (bucket ->
        file), its own weights (all but `shared`, which every rank holds alike) as weights/rank_RR.safetensors,
        and with `write_shared` the shared ones as weights/shared.safetensors. Returns the manifest entries
        of what it wrote."""
        root, files = Path(folder), {}
        blobs = self._graph_blobs()
        for bucket, relpath in writes.items():
            files.update(write_graph_file(root, relpath, blobs[bucket]))
        if self._weights is not None:
            if write_shared and shared:
                files.update(write_weight_file(root, "weights/shared.safetensors", {k: self._weights[k] for k in shared}))
            common = set(shared)
            own = {k: v for k, v in self._weights.items() if k not in common}
            files.update(write_weight_file(root, f"weights/rank_{self.rank:02d}.safetensors", own))
        return files

    def load(self, backend: str, graphs: list[bytes], weights: dict[str, torch.Tensor] | Sequence[WeightFile] | None,
             threads: int, aliases: dict[str, int] | None = None) -> float:
        """Hold this rank's shard: its bucket graphs bound to its weights. Returns the seconds it took.

        `weights` are tensors, or this rank's weight files (cluster.trace.artifact.WeightFile), which
        the rank checks and reads itself (memory-mapped, each tensor copied once): the weights exist
        once, here, and nowhere on the way. With a backend that `loads_lazily` (cpu), a graph is
        deserialized on its bucket's first run instead (~0.3 s of CPU a graph, most of them buckets
        a replica may never run; the files were checked against the manifest when read)."""
        started = time.perf_counter()
        if threads > 0:
            torch.set_num_threads(threads)
            self._threads = threads
        self._aliases = dict(aliases or {})
        self._backend = get_backend(backend)
        self._backend.prepare_rank(self.rank, self.world_size, self.node)  # neuron: its runtime env and collectives
        self._weights = _held(weights)
        self._graphs, self._calls = [None] * len(graphs), [None] * len(graphs)
        self._blobs = list(graphs)
        if not self._backend.loads_lazily:
            for bucket in range(len(graphs)):
                self._bound(bucket)
        return time.perf_counter() - started

    def load_draft(self, graphs: list[bytes], weights: dict[str, torch.Tensor] | Sequence[WeightFile] | None,
                   aliases: dict[str, int] | None = None) -> None:
        """Hold a whole TP=1 draft beside this rank's shard (fused speculation): every rank of the
        target gets the same graphs and its own copy of the weights (its own mapping of the draft's
        files, when given files) and KV cache."""
        if self._backend is None:
            raise ClusterError("load the target's shard before its fused draft")
        if isinstance(weights, dict):
            own = {k: v.clone() for k, v in weights.items()}
        else:
            own = _held(weights)
        self._draft = _DraftShard([None] * len(graphs), own, dict(aliases or {}), list(graphs))
        if not self._backend.loads_lazily:
            for bucket in range(len(graphs)):
                self._bound(bucket, draft=True)

    def weight_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        if self._weights is None:
            raise InputError("weights are inlined in the graphs; trace with inline_weights_to_neff=False to replace them")
        return {k: (tuple(v.shape), str(v.dtype)) for k, v in self._weights.items()}

    def replace_weights(self, new: dict[str, torch.Tensor]) -> None:
        """Copy new values into the bound weights in place: every bucket graph sees them, no retrace."""
        with torch.no_grad():
            for key, value in new.items():
                self._weights[key].copy_(value)
            for bucket, graph in enumerate(self._graphs):  # backends that copy weights at bind time
                if graph is not None:  # (one not loaded yet binds the new values when it is)
                    self._calls[bucket] = self._backend.bind(graph, self._weights, self._aliases)

    def warm_up(self) -> None:
        """A hot spare (rank -1) pays now what a new rank pays on its first load: the backends' imports."""
        get_backend("cpu")

    def assume_rank(self, rank: int) -> None:
        """A hot spare takes the place of `rank`, whose process died (actors.rank_group.replace_lost);
        the group is then formed again and the shard loaded."""
        if self.rank >= 0:
            raise ClusterError(f"rank {self.rank} is not a spare; it cannot become rank {rank}")
        self.rank = rank

    def ping(self) -> int:
        return self.rank

    def timings(self, reset: bool) -> dict[str, float]:
        """Graph calls since the last reset: count, seconds in them, and seconds of those in collectives."""
        collective_s, collectives = collective_time(reset)
        out = {"runs": self._runs, "run_s": self._run_s, "collective_s": collective_s, "collectives": collectives}
        if reset:
            self._run_s, self._runs = 0.0, 0
        return out


def _leading_rows_of(new: torch.Tensor, state: torch.Tensor) -> bool:
    """`new` is the state's own leading rows (a view of them), not a tensor to copy in."""
    return (new.data_ptr() == state.data_ptr() and new.dtype == state.dtype and new.shape[1:] == state.shape[1:]
            and new.shape[0] <= state.shape[0] and new.stride() == state.stride())


def _flat(outputs: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]


def _resident_bytes() -> int:
    """This process's resident memory (Linux), 0 where unknown."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
