"""parallel_model_trace / parallel_model_save / parallel_model_load / replace_weights."""

from __future__ import annotations

import os
import site
import sys
import time
from pathlib import Path
from typing import Any, Callable

import cloudpickle
import torch

from cluster import runtime
from cluster.coordinator import CoordinatorConfig
from cluster.errors import CheckpointError, InputError
from cluster.parallel_layers.checkpoint import find_rank_file, read_state_dict
from cluster.parallel_layers.sharding import split_state_dict
from cluster.signature import as_input_tuple, signature_of
from cluster.trace.backends import resolve_backend
from cluster.trace.config import BucketModelConfig, TraceSpec
from cluster.trace.model import ParallelModel

_OUR_PACKAGES = ("cluster", "actors", "clients")


class _Progress:
    """One line per step on a terminal; silent when not a terminal or when turned off."""

    def __init__(self, enabled: bool | None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[tpcluster] {message}", file=sys.stderr, flush=True)


def _pickle_function(func: Callable[[], Any]) -> bytes:
    """cloudpickle `func`, by value when its module is not importable in the ranks (a script, a test)."""
    module = sys.modules.get(getattr(func, "__module__", "") or "")
    installed = tuple(site.getsitepackages() + [site.getusersitepackages(), os.path.dirname(os.__file__)])
    by_value = (
        module is not None and module.__name__ != "__main__"
        and module.__name__.split(".")[0] not in _OUR_PACKAGES
        and not (getattr(module, "__file__", None) or "").startswith(installed)
    )
    if by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(func)
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(module)


def parallel_model_trace(
    func: Callable[[], tuple[torch.nn.Module, dict]],
    example_inputs: Any,
    tp_degree: int = 1,
    inline_weights_to_neff: bool = True,
    bucket_config: BucketModelConfig | None = None,
    compiler_workdir: str | os.PathLike | None = None,
    compiler_args: Any = None,
    backend: str = "auto",
    spmd_mode: bool | None = None,
    progress: bool | None = None,
    coordinator_config: CoordinatorConfig | None = None,
    metadata: dict[str, Any] | None = None,
) -> ParallelModel:
    """Trace `func()`'s model as `tp_degree` shards, one per rank actor, and keep them resident.

    `func` returns `(model, io_aliases)` and runs inside every rank (after the rank's parallel
    state is set), so the model it builds has that rank's slices. With `bucket_config`,
    `example_inputs` is a list with one input tuple per bucket. `spmd_mode` (default: automatic)
    traces rank 0 once and gives its graph to every rank, verified against each rank's module.
    `metadata` (JSON-able) is kept with the model and saved in its manifest.
    """
    if not isinstance(tp_degree, int) or tp_degree < 1:
        raise ValueError(f"tp_degree must be a positive integer, got {tp_degree!r}")
    if bucket_config is not None and inline_weights_to_neff:
        raise ValueError("bucketing needs inline_weights_to_neff=False: pass inline_weights_to_neff=False with bucket_config")
    if bucket_config is not None:
        if not isinstance(example_inputs, (list, tuple)) or not example_inputs:
            raise InputError("with bucket_config, example_inputs is a list with one input tuple per bucket")
        examples = [as_input_tuple(ex, f"example_inputs[{i}]") for i, ex in enumerate(example_inputs)]
        kernel = bucket_config.build_kernel().save_to_buffer()
    else:
        examples = [as_input_tuple(example_inputs, "example_inputs")]
        kernel = None
    config = coordinator_config or CoordinatorConfig()
    spec = TraceSpec(
        func_blob=_pickle_function(func), tp_degree=tp_degree, backend=resolve_backend(backend),
        inline_weights=inline_weights_to_neff, bucket_signatures=tuple(signature_of(ex) for ex in examples),
        cwd=os.getcwd(), compiler_workdir=os.fspath(compiler_workdir) if compiler_workdir else None,
        compiler_args=compiler_args, spmd_mode=spmd_mode, extra=dict(metadata or {}),
    )
    say = _Progress(progress)
    started = time.perf_counter()
    say(f"starting {tp_degree} rank(s), backend {spec.backend}")
    coordinator = runtime.start_coordinator(tp_degree, spec.backend, config)
    try:
        say(f"building the model on {tp_degree} rank(s)")
        coordinator.build(spec, kernel)
        trace_seconds = 0.0
        for bucket, example in enumerate(examples):
            report = coordinator.trace_bucket(bucket, example)
            trace_seconds += report["seconds"]
            say(f"bucket {bucket + 1}/{len(examples)} {signature_of(example)[0].describe()}...: traced "
                f"{'once for all ranks' if report['mode'] == 'once' else 'on every rank'} in {report['seconds']:.1f} s")
        coordinator.finish_trace()
    except BaseException:
        coordinator.close()
        raise
    say(f"ready in {time.perf_counter() - started:.1f} s ({trace_seconds:.1f} s tracing)")
    model = ParallelModel(coordinator)
    model.trace_seconds = trace_seconds
    return model


def parallel_model_save(model: ParallelModel, path: str | os.PathLike) -> None:
    """Save every rank's shard and the manifest into the folder `path`. Each rank writes its own
    graphs and weights there, so no weight passes through this process or the coordinator: `path`
    must be reachable from every rank's node (the local disk on one machine, shared storage on a
    cluster)."""
    model.coordinator.save(str(Path(path).resolve()))


def parallel_model_load(path: str | os.PathLike, coordinator_config: CoordinatorConfig | None = None, *,
                        name: str | None = None, node_ip: str | None = None) -> ParallelModel:
    """Load a saved model onto fresh rank actors; every file is checked against the manifest.

    With `name`, the replica stays resident under that name after this process exits (see
    actors.replicas); `node_ip` places its ranks on that node.
    """
    config = coordinator_config or CoordinatorConfig()
    return ParallelModel(runtime.load_coordinator(path, config, name=name, node_ip=node_ip))


def replace_weights(model: ParallelModel, checkpoint: Any, sharded: bool = False) -> None:
    """Swap new weights (same architecture) into a loaded model in place, with no retrace.

    `checkpoint` is a path (as parallel_layers.load takes) or a whole state dict. Everything is
    checked on every rank before any rank changes: a mismatch leaves the old weights serving.
    """
    coordinator = model.coordinator
    state = coordinator.model_state()
    specs = coordinator.weight_specs()
    world = len(specs)
    if sharded:
        per_rank = [read_state_dict(find_rank_file(checkpoint, r, world)) for r in range(world)]
    else:
        full = checkpoint if isinstance(checkpoint, dict) else read_state_dict(checkpoint)
        missing = sorted(set(state.state_keys) - set(full))
        unexpected = sorted(set(full) - set(state.state_keys))
        if missing or unexpected:
            raise CheckpointError(
                f"replace_weights: checkpoint keys do not match the model (missing {missing[:8]}, "
                f"unexpected {unexpected[:8]}); the old weights keep serving"
            )
        try:
            per_rank = [split_state_dict(full, state.partition_dims, r, world) for r in range(world)]
        except ValueError as exc:
            raise CheckpointError(f"replace_weights: {exc}; the old weights keep serving") from exc
    for rank, (new, have) in enumerate(zip(per_rank, specs)):
        _check_replacement(rank, new, have)
    coordinator.replace_weights(per_rank)


def _check_replacement(rank: int, new: dict[str, torch.Tensor], have: dict[str, tuple]) -> None:
    unknown = sorted(set(new) - set(have))
    wrong = [f"{k}: {tuple(v.shape)} vs {have[k][0]}" for k, v in new.items() if k in have and tuple(v.shape) != tuple(have[k][0])]
    if unknown or wrong:
        raise CheckpointError(
            f"replace_weights: rank {rank}'s checkpoint does not fit (unexpected {unknown[:8]}, "
            f"shape mismatches {wrong[:8]}); the old weights keep serving"
        )
