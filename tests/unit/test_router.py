"""The Generate router (actors.gateway.router) on its own: routing, carrying generations on after a
replica loss, lending draft replicas. Replicas and pool are stand-ins; no scheduler loop runs (each
test ends before its tasks would take a step)."""

import asyncio
from types import SimpleNamespace

from actors.gateway.router import GenerationRouter
from actors.gateway.scheduling import Generation
from cluster.errors import ModelUnavailable
from cluster.generation.types import GenerationRequest


class _Pool:
    def __init__(self, ready: list[bool]) -> None:
        self.replicas = [SimpleNamespace(index=i, ready=r, coordinator=f"coordinator {i}") for i, r in enumerate(ready)]
        self.config = SimpleNamespace(call_timeout_s=30.0)

    def unavailable(self) -> ModelUnavailable:
        return ModelUnavailable("model 'm' has no ready replica right now; retry shortly")


def _router(ready: list[bool], encoder_decoder: bool = False) -> tuple[GenerationRouter, list[int]]:
    carried: list[int] = []
    router = GenerationRouter("m", _Pool(ready), capacity=2, max_prompt=8, encoder_decoder=encoder_decoder,
                              record_batch=lambda rows: None, record_carried_on=lambda: carried.append(1))
    return router, carried


def _generation(*prompts: tuple[int, ...], emitted: tuple[int, ...] = (), max_new_tokens: int = 10) -> Generation:
    generation = Generation(GenerationRequest(prompts=prompts, max_new_tokens=max_new_tokens))
    generation.emitted.extend(emitted)
    return generation


def _run(test) -> None:
    async def body():
        router = await test()
        await router.close()

    asyncio.run(body())


def test_a_generation_joins_the_least_loaded_ready_replica_not_lent_out():
    async def test():
        router, _ = _router([False, True, True, True])
        lost, lent, loaded, free = router.schedulers
        lent.lent_to = lost
        loaded.waiting.append(_generation((1,)))
        first = _generation((1, 2))
        assert router.route(first) is free and first.scheduler is free and list(free.waiting) == [first]
        assert router.route(_generation((3,))) is loaded  # a tie: the first of the least loaded
        for scheduler in (loaded, free):
            scheduler.replica.ready = False
        assert router.route(_generation((4,))) is lent  # the only ready replica, even lent out
        lent.replica.ready = False
        refused = _generation((5,))
        try:
            router.route(refused)
        except ModelUnavailable as exc:
            assert refused.out.get_nowait() is exc and router.waiting == 4
        else:
            raise AssertionError("routed with no replica ready")
        return router

    _run(test)


def test_a_lost_replicas_generations_go_on_on_another_from_where_they_were():
    async def test():
        router, carried = _router([False, True])
        lost, other = router.schedulers
        going_on = _generation((1, 2, 3), emitted=(4, 5))
        going_on.session = 7
        rows = _generation((1,), (2,))  # several rows: not carried on
        too_long = _generation((1, 2, 3, 4, 5, 6), emitted=(7, 8, 9))  # 9 > max_prompt 8
        done = _generation((1,), emitted=(2, 3), max_new_tokens=2)  # nothing left to generate
        cancelled = _generation((1,))
        cancelled.cancelled = True
        assert router.on_lost(lost, [going_on, rows, too_long, done, cancelled]) == [rows, too_long, done, cancelled]
        assert list(other.waiting) == [going_on] and going_on.scheduler is other and not lost.waiting
        assert going_on.request.prompts == ((1, 2, 3, 4, 5),) and going_on.request.resumed == 2
        assert going_on.session is None and going_on.emitted == [] and carried == [1]
        return router

    _run(test)


def test_with_no_replica_ready_a_lost_generation_waits_for_its_replicas_rebuild():
    async def test():
        router, carried = _router([False, False])
        lost, other = router.schedulers
        generation = _generation((1, 2), emitted=(3,))
        assert router.on_lost(lost, [generation]) == []
        assert list(lost.waiting) == [generation] and not other.waiting and carried == [1]
        assert generation.request.prompts == ((1, 2, 3),) and generation.request.resumed == 1
        return router

    _run(test)


def test_an_encoder_decoder_carries_on_only_generations_that_streamed_nothing():
    async def test():
        router, carried = _router([False, True], encoder_decoder=True)
        lost, other = router.schedulers
        started, unstarted = _generation((1, 2), emitted=(3,)), _generation((1, 2))
        assert router.on_lost(lost, [started, unstarted]) == [started]
        assert list(other.waiting) == [unstarted] and carried == [1]
        return router

    _run(test)


def test_a_failed_stream_sends_its_waiting_generations_elsewhere_only_when_its_replica_is_out():
    async def test():
        router, _ = _router([True, True])
        failed, other = router.schedulers
        waiting = [_generation((1,)), _generation((2,))]
        failed.waiting.extend(waiting)
        router.on_stream_failed(failed)  # its replica is still in rotation: they stay
        assert list(failed.waiting) == waiting and not other.waiting
        failed.replica.ready = False
        router.on_stream_failed(failed)
        assert list(other.waiting) == waiting and not failed.waiting
        other.replica.ready = False
        other.waiting.clear()
        failed.waiting.extend(waiting)
        router.on_stream_failed(failed)  # no replica ready: they wait for the rebuild
        assert list(failed.waiting) == waiting
        return router

    _run(test)


def test_a_draft_model_lends_a_free_replica_until_it_is_taken_back():
    async def test():
        draft, _ = _router([False, True, True, True])
        target, _ = _router([True])
        borrower = target.schedulers[0]
        lost, busy, free, spare = draft.schedulers
        busy.active[0] = _generation((1,))
        assert draft.lend(borrower) is free and free.lent_to is borrower
        assert draft.lend(borrower) is spare
        assert draft.lend(borrower) is None  # the busy one is never lent
        draft.take_back(free)
        assert free.lent_to is None and draft.lend(borrower) is free
        return draft

    _run(test)
