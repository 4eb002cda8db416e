"""A replica's health is pushed: a rank lost while idle breaks it at once, watchers see the loss
and the rebuild's end as they happen, and a replaced rank group's late report is ignored; a rank
lost during a generation step is reported once. No Ray."""

import threading
from concurrent import futures

import pytest

from cluster.coordinator import Coordinator, CoordinatorConfig
from cluster.errors import ModelUnavailable, RankFailure
from cluster.generation.layout import DecoderLayout
from cluster.generation.types import GenerationRequest
from cluster.rank_group import RankGroup
from cluster.signature import TensorSpec, signature_of
from cluster.trace.state import ModelState


class _Ranks(RankGroup):
    """Ranks that answer every call at once (what a rebuild does to them is all this test watches)."""

    def __init__(self, world_size: int = 2) -> None:
        self.world_size = world_size
        self.calls: list[str] = []
        self.closed = False

    def _fan_out(self, method, args, timeout, ranks=None):
        self.calls.append(method)
        return [rank if method == "ping" else None for rank in range(len(args))]

    def form_group(self, timeout, threads):
        self.calls.append("form_group")

    def close(self):
        self.closed = True


def _loaded(factory) -> Coordinator:
    coordinator = Coordinator(_Ranks(), CoordinatorConfig(), rank_group_factory=factory)
    state = ModelState(tp_degree=2, backend="cpu", inline_weights=False, buckets=[(TensorSpec((1, 4), "int64"),)])
    coordinator.load(state, [[b"graph"], [b"graph"]], [{}, {}])
    return coordinator


def test_a_lost_rank_is_pushed_then_the_rebuilt_replica():
    release = threading.Event()
    built: list[_Ranks] = []

    def factory() -> _Ranks:
        release.wait(10)
        built.append(_Ranks())
        return built[-1]

    coordinator = _loaded(factory)
    first = coordinator.ranks
    version, broken = coordinator.watch_health(-1, 0)
    assert broken is None
    with futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(coordinator.watch_health, version, 10)
        coordinator.rank_lost(first, RankFailure(1, "rank 1's process died"))
        version, broken = waiting.result(5)
    assert "rank 1" in broken and not built  # reported at once, before the rebuild has new ranks
    assert coordinator.watch_health(version, 0) == (version, broken)  # nothing new while it rebuilds
    release.set()
    while broken is not None:
        version, broken = coordinator.watch_health(version, 10)
    assert coordinator.rebuilds == 1 and first.closed and coordinator.ranks is built[0]
    assert built[0].calls == ["form_group", "load"]  # the shards come from the kept payload
    assert coordinator.health() == [0, 1]
    assert set(coordinator.rebuild_phases()) == {"close", "placement", "rendezvous", "load"}


def test_a_replaced_groups_late_report_is_ignored():
    coordinator = _loaded(_Ranks)
    first = coordinator.ranks
    coordinator.rank_lost(first, RankFailure(0, "rank 0's process died"))
    version, broken = coordinator.watch_health(-1, 0)
    while broken is not None:
        version, broken = coordinator.watch_health(version, 10)
    coordinator.rank_lost(first, RankFailure(1, "rank 1's process died"))  # the old group's watch, late
    assert coordinator.watch_health(version, 0) == (version, None)
    assert coordinator.rebuilds == 1


class _DyingRanks(_Ranks):
    """Ranks whose process dies at the first serving call, as a kill -9 during a generation step shows."""

    def _fan_out(self, method, args, timeout, ranks=None):
        if method == "run":
            raise RankFailure(1, "the rank's process died during run")
        return super()._fan_out(method, args, timeout, ranks)


@pytest.mark.parametrize("path", ["generate_step", "generate_rounds"])
def test_a_rank_lost_during_a_generation_step_is_reported_once(path):
    layout = DecoderLayout(batch_buckets=(1,), prompt_buckets=(8,), cache_buckets=(16,))
    state = ModelState(tp_degree=2, backend="cpu", inline_weights=False,
                       buckets=[signature_of(example) for example in layout.examples()],
                       extra={"decoder": {"layout": layout.to_json(), "vocab_size": 16}})
    coordinator = Coordinator(_DyingRanks(), CoordinatorConfig())
    coordinator.load(state, [[b"graph"], [b"graph"]], [{}, {}])
    request = GenerationRequest(((1, 2, 3),), 4)
    with pytest.raises(RankFailure) as info:
        if path == "generate_step":  # the step's prefill calls `run`, inside the step's own failure handling
            coordinator.generate_step(coordinator.generate_open(request))
        else:
            list(coordinator.generate_rounds("gateway", [("tag", request, None)]))
    assert str(info.value) == "rank 1: the rank's process died during run; the replica is rebuilding"
    assert coordinator.info().broken == "rank 1: the rank's process died during run"
    with pytest.raises(ModelUnavailable, match="it is rebuilding"):  # the sessions went with the caches
        coordinator.generate_open(request)
