"""The per-step rank calls of a replica through a Ray Compiled Graph.

A replica calls its ranks on every generated token (`SERVING_METHODS`: `run`, with one of the
cluster.generation.plan call types). As ordinary actor calls each fan-out costs a task submission
per rank and a wait through the object store (~1.2 ms for two ranks on a 2-core node); through a compiled graph, whose
channels are shared memory between the coordinator and ranks, the same fan-out costs ~0.4 ms
(measured here with a [1, 256] int64 input; Ray documents < 50 us on idle machines). Control calls (trace, load,
replace_weights, describe, health) stay ordinary actor calls: a rank actor answers them while the
graph is compiled.

The graph is compiled once the replica holds its shards and torn down with its rank group: a
replica that loses a rank gets a new rank group, and with it a new graph.

Its readers wait by spinning: Ray 2.60 polls a channel with sched_yield, so the coordinator burns a
core for the whole of each call and every rank burns one while it waits for the next. On the cpu
backend, where those cores are the model's, a replica's per-step calls are ordinary actor calls
instead (`CoordinatorConfig.rank_calls`, `actors.rank_group.uses_graph`).
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import ray

from actors.rank_actor import WARM_UP, from_wire, to_wire


class StepGraph:
    """A per-step call (one of `SERVING_METHODS`) on every rank of a group, as one compiled-graph execution."""

    def __init__(self, actors: Sequence[Any], submit_timeout_s: float) -> None:
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as request:
            dag = MultiOutputNode([actor.serve.bind(request) for actor in actors])
        # One execution in flight, so one shared-memory buffer per channel (Ray's default is 10 per
        # channel, 1 MB each, and more once a large result has resized them). Ray 2.60 never frees a
        # compiled graph's channel buffers, not even at teardown (ray-project/ray#43836): every rebuild
        # of a replica leaked all of them, in the object store and in this process's resident set
        # (issue 15; a tiny TP=2 decoder: 30 buffers, ~30 MB of store and ~12 MB of RSS a rebuild,
        # now 3 buffers and ~1 MB). `run` waits for each execution before the next, so one is enough.
        self._graph = dag.experimental_compile(_submit_timeout=submit_timeout_s, _max_inflight_executions=1)
        # Executed once now, so every channel has its reader and writer registered: Ray 2.60 kills the
        # owning process (a failed CHECK in MutableObjectProvider::RegisterReaderChannel) when a graph
        # that never ran is torn down after one of its actors died (seen: an idle replica losing a rank).
        self.run(WARM_UP, (), submit_timeout_s)

    def run(self, method: str, args: tuple, timeout: float) -> list[Any]:
        """Every rank's answer, in rank order; raises what the ranks raised, or Ray's errors for a lost one."""
        ref = self._graph.execute((method, to_wire(args)))
        return [from_wire(result) for result in ray.get(ref, timeout=timeout)]

    def close(self, timeout: float) -> None:
        """Tear the graph down; bounded, since a rank that died may leave the teardown waiting."""
        worker = threading.Thread(target=self._graph.teardown, name="step-graph-teardown", daemon=True)
        worker.start()
        worker.join(timeout)
