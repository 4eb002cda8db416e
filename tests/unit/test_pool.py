"""The gateway's control plane (ReplicaPool) on its own: routing, loss, health, with no Ray.

Replicas here are in-process coordinators over thread ranks (the eager backend), reached through
the same async handle interface the gateway uses for Ray coordinators.
"""

import asyncio

import pytest
import torch

from actors.gateway.batching import BatchingConfig
from actors.gateway.pool import Replica, ReplicaPool
from actors.gateway.served import ServedModel
from cluster.coordinator import Coordinator, CoordinatorConfig
from cluster.errors import ClusterTimeout, CoordinatorLost, ModelUnavailable, RankFailure
from cluster.handle import AsyncOverThreads
from cluster.rank_group import InProcessRankGroup
from cluster.serving import ServingSpec
from cluster.trace import parallel_model_trace
from tests.support import Block, block_builder


class FlakyHandle(AsyncOverThreads):
    """An in-process coordinator's async handle that can be told to fail like a lost rank or to stall."""

    def __init__(self, coordinator: Coordinator) -> None:
        super().__init__(coordinator)
        self.fail: BaseException | None = None
        self.calls = 0

    async def _call(self, method, *args, timeout):
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return await super()._call(method, *args, timeout=timeout)


@pytest.fixture(scope="module")
def traced():
    torch.manual_seed(3)
    state = Block().eval().state_dict()
    ids = torch.randint(0, 32, (2, 6))
    model = parallel_model_trace(block_builder(state), ids, tp_degree=2, backend="eager", progress=False)
    yield model, ids
    model.close()


def _pool(model, count=2):
    """`count` replicas over the one traced coordinator, each with its own handle to fail."""
    handles = [FlakyHandle(model.coordinator) for _ in range(count)]
    replicas = [Replica(index, _Shim(model.coordinator, handle)) for index, handle in enumerate(handles)]
    return ReplicaPool("block", None, replicas, resident=False), handles


class _Shim:
    """One replica's view of the shared coordinator: its own async handle."""

    def __init__(self, coordinator, handle):
        self._coordinator, self.aio, self.config = coordinator, handle, coordinator.config

    def info(self):
        return self._coordinator.info()

    def close(self):
        pass


def test_routing_prefers_the_replica_with_fewer_calls_in_flight(traced):
    model, ids = traced
    pool, handles = _pool(model)
    pool.replicas[0].in_flight = 3
    out = asyncio.run(pool.run(lambda h: h.forward((ids,), timeout=30)))
    torch.testing.assert_close(out, model(ids))
    assert handles[1].calls == 1 and handles[0].calls == 0


def test_a_lost_rank_takes_the_replica_out_at_once_and_health_brings_it_back(traced):
    model, ids = traced
    pool, handles = _pool(model)
    handles[0].fail = RankFailure(1, "the rank's process died during forward")
    pool.replicas[1].in_flight = 5  # route to replica 0 first

    async def scenario():
        served = await pool.run(lambda h: h.forward((ids,), timeout=30))  # lost on 0, served by 1
        assert not pool.replicas[0].ready and pool.ready and pool.ready_count == 1
        assert "rank 1" in pool.replicas[0].error
        assert handles[0].calls == 1 and handles[1].calls == 1
        handles[0].fail = None
        assert await pool.check_health()
        return served

    torch.testing.assert_close(asyncio.run(scenario()), model(ids))
    assert pool.replicas[0].ready and pool.replicas[0].recoveries == 1 and pool.replicas[0].error == ""


def test_a_call_lost_with_its_replica_is_moved_once_and_only_when_the_pool_routed_it(traced):
    model, ids = traced
    pool, handles = _pool(model, count=3)
    handles[0].fail = CoordinatorLost("model 'block' coordinator died (pid 1234)")
    handles[1].fail = RankFailure(0, "the rank's process died during forward")
    pool.replicas[1].in_flight, pool.replicas[2].in_flight = 1, 2  # the order it tries: 0, then 1, then 2
    forward = lambda h: h.forward((ids,), timeout=30)

    async def scenario():
        with pytest.raises(ModelUnavailable, match="replica 1: rank 0") as lost:
            await pool.run(forward)  # 0 lost, moved to 1, lost too: no third try
        assert isinstance(lost.value.__cause__, ModelUnavailable) and "replica 0" in str(lost.value.__cause__)
        assert [h.calls for h in handles] == [1, 1, 0] and pool.ready_count == 1
        pool.replicas[1].ready = True
        with pytest.raises(ModelUnavailable, match="replica 1: rank 0"):
            await pool.run(forward, replica=pool.replicas[1])  # pinned to its replica: never moved
        assert [h.calls for h in handles] == [1, 2, 0]
        pool.replicas[0].ready = True
        pool.replicas[2].in_flight = 0
        loop = asyncio.get_running_loop()
        with pytest.raises(ModelUnavailable, match="replica 0: model 'block' coordinator died"):
            await pool.run(forward, deadline=loop.time() - 1)  # its deadline passed: not moved
        assert [h.calls for h in handles] == [2, 2, 0]
        pool.replicas[0].ready = True
        return await pool.run(forward, deadline=loop.time() + 30)  # lost on 0, served by 2 in time

    torch.testing.assert_close(asyncio.run(scenario()), model(ids))
    assert [h.calls for h in handles] == [3, 2, 1]
    assert not pool.replicas[0].ready and pool.replicas[2].ready and pool.replicas[2].in_flight == 0


def test_no_ready_replica_is_unavailable_and_a_busy_one_stays_in_rotation(traced):
    model, ids = traced
    pool, handles = _pool(model, count=1)
    handles[0].fail = ClusterTimeout("coordinator health did not answer within 10.0 s")
    assert asyncio.run(pool.check_health())  # busy is not lost
    pool.replicas[0].ready = False
    with pytest.raises(ModelUnavailable, match="no ready replica"):
        pool.pick()


def test_an_in_process_coordinator_is_a_complete_async_handle():
    coordinator = Coordinator(InProcessRankGroup(1), CoordinatorConfig(health_timeout_s=0.5))
    try:
        coordinator.start()
        info = asyncio.run(coordinator.aio.info(timeout=5))
        assert info.tp_degree == 1 and info.backend is None and info.decoder == {}
        assert asyncio.run(coordinator.aio.health(timeout=5)) == [0]
    finally:
        coordinator.close()


def test_an_infer_request_in_flight_on_a_lost_replica_succeeds_on_the_other(traced):
    """The gateway's data path (ServedModel.infer, through its dynamic batcher: 2 rows < 4) over the same pool."""
    model, ids = traced
    pool, handles = _pool(model)
    handles[0].fail = RankFailure(1, "the rank's process died during forward")
    pool.replicas[1].in_flight = 1  # route to replica 0 first
    served = ServedModel("block", ServingSpec(task="infer", batch_buckets=(4,)), pool, BatchingConfig())

    async def scenario():
        try:
            return await served.infer([("input_0", ids.numpy())], timeout=30)
        finally:
            await served.close()

    (name, out), = asyncio.run(scenario())
    assert name == "output_0" and handles[0].calls == 1 and handles[1].calls == 1
    torch.testing.assert_close(torch.from_numpy(out), model(ids))
    assert not pool.replicas[0].ready and pool.replicas[1].ready
