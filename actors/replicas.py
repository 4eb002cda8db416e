"""Replicas of a saved model on the cluster: launch one, or adopt a resident one (one path for both,
used by the gateway, batch jobs and `tpcluster unload`).

A resident replica is a named, detached coordinator actor (`replica_name(model, index)`) that
outlives the process that loaded it. Its label records the folder and the manifest digest it was
loaded from; it is adopted only when that digest is the folder's digest now, so a replaced model
folder is never served from stale shards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import ray

from actors.coordinator_actor import RemoteCoordinator, launch_coordinator
from actors.placement import pick_node, rank_nodes
from actors.runtime import NAMESPACE, ensure_ray
from cluster.coordinator_config import CoordinatorConfig
from cluster.trace import artifact
from cluster.trace.fused import read_fused_draft

log = logging.getLogger("tpcluster.replicas")


def replica_name(model: str, index: int) -> str:
    """The name under which replica `index` of model `model` is found in the cluster."""
    return f"{model}.replica{index}"


@dataclass
class Placement:
    """The nodes a model's replicas already occupy: the next replica avoids them where it can."""

    nodes: set[str] = field(default_factory=set)


def launch_replica(folder: str | Path, config: CoordinatorConfig | None = None, *, name: str | None = None,
                   node_ip: str | None = None) -> RemoteCoordinator:
    """Load the saved model in `folder` onto fresh rank actors; every file is checked against the
    manifest. With `name` the replica is resident (named, detached); `node_ip` pins its ranks."""
    state, graphs, weights = artifact.read(folder, mapped=True)  # each rank maps its own weight files
    draft = read_fused_draft(folder, mapped=True)
    label = {"path": str(Path(folder).resolve()), "manifest": artifact.digest(folder)} if name else None
    coordinator = launch_coordinator(state.tp_degree, config or CoordinatorConfig(), name=name, label=label,
                                     node_ip=node_ip)
    try:
        coordinator.start()
        coordinator.load(state, graphs, weights, draft)
    except BaseException:
        coordinator.close()
        raise
    return coordinator


def find_resident(name: str, config: CoordinatorConfig | None = None) -> tuple[RemoteCoordinator, dict] | None:
    """The live, loaded resident coordinator named `name`, with its label; None when there is none.

    A dead or wedged one, or one whose loader died half way, is closed here (frees the name and
    its cores) so the caller can replace it.
    """
    wait = (config or CoordinatorConfig()).health_timeout_s
    ensure_ray()
    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None
    try:
        identity = ray.get(actor.identity.remote(), timeout=wait)
    except Exception:  # dead or wedged: the caller replaces it
        RemoteCoordinator(actor, config or CoordinatorConfig(), name=name).close()
        return None
    coordinator = RemoteCoordinator(actor, identity["config"], identity["group_name"], name)
    if not identity["loaded"]:
        coordinator.close()
        return None
    return coordinator, identity["label"]


def adopt_replica(model: str, index: int, folder: str | Path) -> RemoteCoordinator | None:
    """Replica `index` of `model` when it is resident and holds exactly the model in `folder`.

    A resident replica holding another model (the folder changed since) is closed, and None
    returned, so the caller loads the folder again.
    """
    found = find_resident(replica_name(model, index))
    if found is None:
        return None
    coordinator, label = found
    if label.get("manifest") == artifact.digest(folder):
        return coordinator
    log.warning("model %s replica %d: the resident replica holds another model (%s); replacing it",
                model, index, label.get("path"))
    coordinator.close()
    return None


def adopt_or_launch(model: str, folder: str | Path, index: int, placement: Placement, resident: bool,
                    config: CoordinatorConfig | None = None) -> tuple[RemoteCoordinator, bool]:
    """Replica `index` of `model`: the resident one when it holds this very folder, else a new one on
    a node that holds no replica of the model yet. Returns (coordinator, adopted)."""
    coordinator = adopt_replica(model, index, folder) if resident else None
    adopted = coordinator is not None
    if coordinator is None:
        tp_degree = int(artifact.read_manifest(folder)["tp_degree"])
        coordinator = launch_replica(folder, config, name=replica_name(model, index) if resident else None,
                                     node_ip=pick_node(tp_degree, placement.nodes))
    placement.nodes |= rank_nodes(coordinator.describe_ranks())
    return coordinator, adopted


def resident_replicas(model: str) -> list[tuple[RemoteCoordinator, dict]]:
    """(coordinator, label) of every resident replica of `model`, in replica order."""
    found: list[tuple[RemoteCoordinator, dict]] = []
    while (replica := find_resident(replica_name(model, len(found)))) is not None:
        found.append(replica)
    return found


__all__ = ["Placement", "adopt_or_launch", "adopt_replica", "find_resident", "launch_replica",
           "replica_name", "resident_replicas"]
