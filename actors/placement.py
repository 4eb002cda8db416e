"""Where a replica's TP group goes: spread the replicas of one model over nodes.

A replica's ranks are always packed on one node (STRICT_PACK: TP collectives must not cross
instances). Which node is chosen here: one that can hold the whole group, preferring nodes that
hold no replica of the same model yet, then the one with the most free NeuronCores, so a node's
loss takes out as few replicas of a model as possible and the gateway balances over nodes.
"""

from __future__ import annotations

from typing import Iterable

import ray


def _free_cores_per_node() -> dict[str, float]:
    """Free NeuronCores by node IP (Ray keeps this per node id; its public API only sums it up)."""
    from ray._private.state import state

    free = state.available_resources_per_node()
    by_id = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")}
    return {by_id[node_id]: resources.get("neuron_cores", 0.0) for node_id, resources in free.items() if node_id in by_id}


def pick_node(tp_degree: int, avoid: Iterable[str] = ()) -> str | None:
    """The IP of the node for the next replica's ranks; None when only one node could hold it."""
    totals = {node["NodeManagerAddress"]: node["Resources"].get("neuron_cores", 0.0)
              for node in ray.nodes() if node.get("Alive")}
    try:
        free = _free_cores_per_node()
    except Exception:  # an older or newer Ray without the per-node view: count every core as free
        free = dict(totals)
    fits = [ip for ip, total in totals.items() if total >= tp_degree]
    if len(fits) <= 1:
        return None
    avoid = set(avoid)
    ranked = sorted(fits, key=lambda ip: (free.get(ip, 0.0) < tp_degree, ip in avoid, -free.get(ip, 0.0), ip))
    return ranked[0]


def rank_nodes(ranks: list[dict]) -> set[str]:
    """The node IPs of a replica's ranks, from Coordinator.start()/describe_ranks()."""
    return {str(r.get("node") or r.get("node_ip") or "") for r in ranks} - {""}
