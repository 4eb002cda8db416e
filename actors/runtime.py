"""Starting or attaching to the Ray cluster that hosts the rank actors."""

from __future__ import annotations

import glob
import logging
import os
import time
from typing import Any

import ray

from cluster.backoff import Backoff

NAMESPACE = "tpcluster"
DEFAULT_LOGICAL_NEURON_CORES = 8
# Ray Client's proxy starts a server process per client; on a busy head that start can fail once
# and work on the next try, so attaching through ray:// is retried for this long.
CLIENT_ATTACH_TIMEOUT_S = 60.0
CLIENT_ATTACH_BACKOFF = Backoff(initial_s=1.0, max_s=8.0)

log = logging.getLogger(__name__)

#: Ray starts its workers at nice 15 (its `worker_niceness`), so on a busy node every other process
#: preempts them. Rank and coordinator processes are the per-token path: they run at normal
#: priority (measured on a loaded 2-core node: a TP=2 decode step 20 ms at nice 15, 10 ms at 0).
SERVING_PROCESS_ENV = {"RAY_worker_niceness": "0"}


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
        _attach(address, options)
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


def _attach(address: str, options: dict[str, Any]) -> None:
    if not address.startswith("ray://"):
        ray.init(address=address, **options)
        return
    deadline = time.monotonic() + CLIENT_ATTACH_TIMEOUT_S
    for delay in CLIENT_ATTACH_BACKOFF.delays():
        try:
            ray.init(address=address, **options)
            return
        except ConnectionError as error:  # the proxy could not start this client's server; Ray disconnected cleanly
            if time.monotonic() + delay > deadline:
                raise ConnectionError(
                    f"could not attach to the Ray cluster at {address} through Ray Client for "
                    f"{CLIENT_ATTACH_TIMEOUT_S:.0f} s: {error}. Check that the head node is up and its client "
                    "server port is reachable, or attach with the GCS address (HOST:PORT) from a cluster node."
                ) from error
            log.warning("attaching to %s failed (%s); retrying in %.0f s", address, error, delay)
            time.sleep(delay)


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
