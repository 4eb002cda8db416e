"""The benchmark's closed-loop driver counts every call of every client thread (issue 12)."""

import contextlib
import threading
import time

from actors.bench.measure import closed_loop


def test_closed_loop_counts_every_concurrent_call_exactly():
    lock = threading.Lock()
    calls: list[int] = []
    opened: list[str] = []

    def connect(target: str):
        opened.append(target)
        return contextlib.nullcontext(f"client for {target}")

    def request(client: str, thread: int) -> int:
        assert client == "client for fake:0"
        time.sleep(0.005)  # a blocking call: the other threads run meanwhile
        with lock:
            calls.append(thread)
        return thread + 1  # a different amount per thread, like tokens per Generate

    total, latencies, elapsed = closed_loop("fake:0", 8, 0.3, request, connect=connect)

    assert opened == ["fake:0"] * 8
    assert set(calls) == set(range(8))
    assert total == sum(thread + 1 for thread in calls)
    assert len(latencies) == len(calls)
    assert all(s >= 0.005 for s in latencies)
    assert 0.3 <= elapsed < 30.0  # the loop ran its 0.3 s and stopped (not a timing check)
