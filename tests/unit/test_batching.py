import asyncio

import pytest

from actors.gateway.batching import BatchingConfig, DynamicBatcher
from cluster.errors import Overloaded


def run(coroutine):
    return asyncio.run(coroutine)


def test_concurrent_requests_are_merged_and_answered_in_order():
    batches = []

    async def forward(payloads):
        batches.append(list(payloads))
        await asyncio.sleep(0.01)
        return [p * 10 for p in payloads]

    async def main():
        batcher = DynamicBatcher("m", forward, BatchingConfig(max_batch_rows=4, max_wait_s=0.05))
        results = await asyncio.gather(*(batcher.submit(i, 1) for i in range(10)))
        await batcher.close()
        return results

    assert run(main()) == [i * 10 for i in range(10)]
    assert [len(b) for b in batches] == [4, 4, 2]


def test_a_full_queue_refuses_instead_of_growing():
    release = asyncio.Event()

    async def forward(payloads):
        await release.wait()
        return payloads

    async def main():
        batcher = DynamicBatcher("m", forward, BatchingConfig(max_batch_rows=1, max_wait_s=0, max_queue=2))
        first = asyncio.ensure_future(batcher.submit("a", 1))
        await asyncio.sleep(0.01)  # "a" is running
        queued = []
        for x in "bcd":  # the collector holds "b" waiting for a free replica; "c" and "d" fill the queue
            queued.append(asyncio.ensure_future(batcher.submit(x, 1)))
            await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="2 requests queued"):
            await asyncio.wait_for(batcher.submit("e", 1), 1.0)
        release.set()
        results = await asyncio.gather(first, *queued)
        await batcher.close()
        return results

    assert run(main()) == ["a", "b", "c", "d"]


def test_a_failed_forward_fails_its_batch_only_and_cancelled_callers_are_dropped():
    seen = []

    async def forward(payloads):
        seen.extend(payloads)
        if "boom" in payloads:
            raise RuntimeError("rank lost")
        return payloads

    async def main():
        batcher = DynamicBatcher("m", forward, BatchingConfig(max_batch_rows=1, max_wait_s=0))
        with pytest.raises(RuntimeError, match="rank lost"):
            await batcher.submit("boom", 1)
        gone = asyncio.ensure_future(batcher.submit("abandoned", 1))
        gone.cancel()
        assert await batcher.submit("fine", 1) == "fine"
        await batcher.close()

    run(main())
    assert "abandoned" not in seen
