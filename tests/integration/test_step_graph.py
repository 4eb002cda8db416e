"""Issue 15: a replica's compiled step graph, rebuilt with every new rank group, leaves little behind.

Ray 2.60 never frees a compiled graph's shared-memory channel buffers, not even at teardown
(ray-project/ray#43836), so each graph compiled and torn down leaks all of them in the object store
(and in the coordinator's resident set). StepGraph keeps one buffer per channel (one execution in
flight) instead of Ray's default ten: a counted bound on store objects, not a memory or timing one.
"""

import pytest
import ray

from actors.rank_actor import WARM_UP, RankActor
from actors.step_graph import StepGraph

pytestmark = pytest.mark.integration


def _store_objects() -> int:
    from ray._private.internal_api import memory_summary

    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    line = next(line for line in summary.splitlines() if "Plasma memory usage" in line)
    return int(line.split(",")[1].split()[0])  # "Plasma memory usage 3 MiB, 12 objects, ..."


def test_a_torn_down_step_graph_leaves_one_buffer_per_channel(ray_cluster):
    actors = [RankActor.remote(rank, 2) for rank in range(2)]
    try:
        assert ray.get([actor.call.remote("ping") for actor in actors], timeout=60) == [0, 1]
        before = _store_objects()
        steps = StepGraph(actors, 30.0)
        assert steps.run(WARM_UP, (), 30.0) == [0, 1]
        steps.close(timeout=10.0)
        # one channel into the ranks and one out of each: 3 buffers (Ray's default would leave 30)
        assert _store_objects() - before <= 2 * (len(actors) + 1)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
