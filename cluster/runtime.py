"""The one seam between the torch library and the Ray layer.

Entry points that start ranks (`parallel_model_trace`, `parallel_model_load`) get a coordinator
handle (cluster.handle.CoordinatorHandle) from here: in-process threads for the `eager` backend,
otherwise a coordinator actor over one Ray actor per rank (imported lazily, so the rest of
`cluster` never imports Ray).
"""

from __future__ import annotations

import os
from typing import Any

from cluster.coordinator import Coordinator, CoordinatorConfig
from cluster.handle import CoordinatorHandle
from cluster.rank_group import InProcessRankGroup


def init(address: str | None = None, neuron_cores: int | None = None, **ray_options: Any) -> None:
    """Start a local cluster (or attach to `address`) before tracing or loading models.

    Without Neuron devices the local cluster advertises `neuron_cores` logical cores (default 8)
    so the same scheduling path runs. Optional: the first trace or load starts a local cluster.
    """
    from actors.runtime import ensure_ray

    ensure_ray(address=address, neuron_cores=neuron_cores, **ray_options)


def shutdown() -> None:
    """Stop the local cluster this process started (models traced on it are gone)."""
    from actors.runtime import stop_ray

    stop_ray()


def start_coordinator(tp_degree: int, backend: str, config: CoordinatorConfig) -> CoordinatorHandle:
    """A started coordinator (collective group formed) for a TP group of `tp_degree` ranks."""
    if backend == "eager":
        coordinator: CoordinatorHandle = Coordinator(InProcessRankGroup(tp_degree), config)
    else:
        from actors.coordinator_actor import launch_coordinator

        coordinator = launch_coordinator(tp_degree, config)
    try:
        coordinator.start()
    except BaseException:
        coordinator.close()
        raise
    return coordinator


def load_coordinator(path: str | os.PathLike, config: CoordinatorConfig, *, name: str | None = None,
                     node_ip: str | None = None) -> CoordinatorHandle:
    """A coordinator holding the saved model in `path` (see actors.replicas.launch_replica)."""
    from cluster.trace import artifact
    from cluster.trace.fused import read_fused_draft

    if artifact.read_manifest(path)["backend"] != "eager":
        from actors.replicas import launch_replica

        return launch_replica(path, config, name=name, node_ip=node_ip)
    state, graphs, weights = artifact.read(path)
    draft = read_fused_draft(path)
    coordinator = start_coordinator(state.tp_degree, state.backend, config)
    try:
        coordinator.load(state, graphs, weights, draft)
    except BaseException:
        coordinator.close()
        raise
    return coordinator
