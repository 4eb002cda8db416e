"""Starting or attaching to the Ray cluster that hosts the rank actors."""

from __future__ import annotations

import glob
import os
from typing import Any

import ray

NAMESPACE = "tpcluster"
DEFAULT_LOGICAL_NEURON_CORES = 8

def has_neuron_devices() -> bool:
    return bool(glob.glob("/dev/neuron[0-9]*"))


def ensure_ray(address: str | None = None, neuron_cores: int | None = None, **options: Any) -> None:
    """Attach to `address`, or start a local single-node cluster bound to 127.0.0.1.

    Without Neuron devices the local node advertises `neuron_cores` logical cores, so rank actors
    are scheduled exactly as on an inf2/trn1 node.
    """
    if ray.is_initialized():
        return
    options.setdefault("namespace", NAMESPACE)
    options.setdefault("log_to_driver", False)
    if address is not None:
        ray.init(address=address, **options)
        return
    # Ray's local-only mode binds every service, and reports every node address, as 127.0.0.1;
    # Ray reads the switch at import, so set it for child processes and for this one.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false", "False")
    if not has_neuron_devices():
        cores = DEFAULT_LOGICAL_NEURON_CORES if neuron_cores is None else neuron_cores
        options.setdefault("resources", {})["neuron_cores"] = cores
    options.setdefault("include_dashboard", False)
    ray.init(**options)


def stop_ray() -> None:
    """Disconnect; a local cluster this process started stops with it."""
    if ray.is_initialized():
        ray.shutdown()


def neuron_core_capacity() -> tuple[int, int]:
    """(most NeuronCores on any one alive node, NeuronCores in the whole cluster)."""
    per_node = [
        int(node["Resources"].get("neuron_cores", 0)) for node in ray.nodes() if node.get("Alive")
    ]
    return max(per_node, default=0), sum(per_node)
