"""Dynamic batching: concurrent requests for one model merged into one forward.

Requests wait in a bounded queue (full: Overloaded, i.e. RESOURCE_EXHAUSTED, never unbounded
queueing). A collector takes requests until `max_batch_rows` rows or `max_wait_s` have passed and
hands the batch to `run_batch`; up to `concurrency` batches run at once (one per replica). A request
whose caller went away (deadline, cancel) before its batch formed is dropped, not run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from cluster.errors import Overloaded


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_rows: int = 16
    max_wait_s: float = 0.005
    max_queue: int = 256
    max_sequences: int = 0  # Generate: sequences decoded together per replica; 0: every KV-cache slot

    def __post_init__(self) -> None:
        if self.max_batch_rows < 1 or self.max_wait_s < 0 or self.max_queue < 1 or self.max_sequences < 0:
            raise ValueError(f"invalid batching config {self}")


@dataclass
class Pending:
    payload: Any
    rows: int
    future: asyncio.Future = field(repr=False)


class DynamicBatcher:
    def __init__(self, name: str, run_batch: Callable[[list[Any]], Awaitable[list[Any]]], config: BatchingConfig,
                 concurrency: int = 1, on_batch: Callable[[int], None] | None = None) -> None:
        self.name = name
        self._run_batch = run_batch
        self.config = config
        self._queue: asyncio.Queue[Pending] = asyncio.Queue(maxsize=config.max_queue)
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._on_batch = on_batch
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"batcher-{self.name}")

    async def submit(self, payload: Any, rows: int) -> Any:
        self.start()
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(Pending(payload, rows, future))
        except asyncio.QueueFull as exc:
            raise Overloaded(
                f"model {self.name!r} has {self.config.max_queue} requests queued; retry later"
            ) from exc
        return await future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            batch, rows = [first], first.rows
            deadline = loop.time() + self.config.max_wait_s
            while rows < self.config.max_batch_rows:
                remaining = deadline - loop.time()
                if remaining <= 0 and self._queue.empty():
                    break
                try:
                    item = self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self._queue.get(), remaining)
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                if rows + item.rows > self.config.max_batch_rows:
                    await self._dispatch(batch)
                    batch, rows = [item], item.rows
                    deadline = loop.time() + self.config.max_wait_s
                    continue
                batch.append(item)
                rows += item.rows
            await self._dispatch(batch)

    async def _dispatch(self, batch: list[Pending]) -> None:
        live = [p for p in batch if not p.future.done()]  # callers that gave up are dropped here
        if not live:
            return
        await self._slots.acquire()
        task = asyncio.get_running_loop().create_task(self._run(live))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[Pending]) -> None:
        try:
            if self._on_batch:
                self._on_batch(sum(p.rows for p in batch))
            results = await self._run_batch([p.payload for p in batch])
            for pending, result in zip(batch, results):
                if not pending.future.done():
                    pending.future.set_result(result)
        except BaseException as exc:  # one failed forward fails its batch, not the batcher
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
        finally:
            self._slots.release()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for task in list(self._running):
            await asyncio.gather(task, return_exceptions=True)
