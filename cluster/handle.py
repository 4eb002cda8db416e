"""The typed coordinator handle: what callers (ParallelModel, generation, the gateway, batch jobs)
may ask of a replica's coordinator, wherever it runs.

`CoordinatorHandle` is the blocking form: `cluster.coordinator.Coordinator` (in-process) and
`actors.coordinator_actor.RemoteCoordinator` (a Ray actor) both implement it. A handle's `aio`
is the asyncio form (`AsyncCoordinatorHandle`) for servers, whose waits must not block their
event loop; `AsyncOverThreads` gives an in-process coordinator one, for tests without Ray.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Protocol, Sequence

if TYPE_CHECKING:  # types only: this module imports no torch
    from cluster.coordinator_config import CoordinatorConfig
    from cluster.generation.plan import Call
    from cluster.generation.types import GenerationRequest, GenerationRound, SessionSummary, StepResult
    from cluster.trace.config import TraceSpec
    from cluster.trace.state import Exported, ModelState


@dataclass(frozen=True)
class CoordinatorInfo:
    """What a coordinator reports of itself and the model it holds."""

    tp_degree: int
    backend: str | None = None
    buckets: list[list[dict]] = field(default_factory=list)  # per bucket, TensorSpec.to_json() per input
    inline_weights: bool | None = None
    trace_mode: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # the model's metadata, e.g. {"decoder": ...}
    pid: int = 0
    broken: str | None = None  # why the replica is not serving, while it rebuilds
    rebuilds: int = 0

    @property
    def decoder(self) -> dict[str, Any]:
        """The decoder's description ({} for models not traced for generation)."""
        return dict(self.extra.get("decoder") or {})


class CoordinatorHandle(Protocol):
    """Blocking calls to one replica's coordinator; every wait is bounded by its CoordinatorConfig."""

    config: CoordinatorConfig
    aio: AsyncCoordinatorHandle  # the serving calls, from asyncio

    def start(self) -> list[dict[str, Any]]: ...
    def build(self, spec: TraceSpec, kernel: bytes | None) -> None: ...
    def trace_bucket(self, bucket: int, example: tuple) -> dict[str, Any]: ...
    def finish_trace(self) -> None: ...
    def load(self, state: ModelState, graphs: Sequence[list[bytes]], weights: Sequence[dict | None],
             draft: tuple | None = None) -> None: ...
    def export(self) -> Exported: ...
    def save(self, path: str) -> None: ...
    def forward(self, inputs: Any) -> Any: ...
    def run(self, call: Call) -> Any: ...
    def generate_open(self, request: GenerationRequest, draft: CoordinatorHandle | None = None) -> int: ...
    def generate_step(self, session_id: int) -> StepResult: ...
    def generate_close(self, session_id: int) -> SessionSummary | None: ...
    def generate_batch(self, opens: Sequence[tuple[GenerationRequest, Any]] = (), closes: Sequence[int] = (),
                       sessions: Sequence[int] = (), resync: bool = False) -> GenerationRound: ...
    def generate_rounds(self, stream: str, opens: Sequence[tuple[Any, GenerationRequest, Any]] = (),
                        closes: Sequence[int] = (), sessions: Sequence[int] = (),
                        resync: bool = False) -> Iterator[GenerationRound]: ...
    def generate_admit(self, stream: str, opens: Sequence[tuple[Any, GenerationRequest, Any]] = (),
                       closes: Sequence[int] = ()) -> None: ...
    def model_state(self) -> ModelState: ...
    def weight_specs(self) -> list[dict[str, Any]]: ...
    def replace_weights(self, states: Sequence[dict]) -> None: ...
    def info(self) -> CoordinatorInfo: ...
    def rank_timings(self, reset: bool = False) -> list[dict[str, float]]: ...
    def compile_graphs(self, buckets: Sequence[int] | None = None) -> list[tuple[int, float, bool]]: ...
    def describe_ranks(self) -> list[dict[str, Any]]: ...
    def describe_spares(self) -> list[dict[str, Any]]: ...
    def health(self) -> list[int]: ...
    def watch_health(self, version: int, wait_s: float) -> tuple[int, str | None]: ...
    def rebuild_phases(self) -> dict[str, float]: ...
    def close(self) -> None: ...


class AsyncCoordinatorHandle(Protocol):
    """The serving calls from asyncio. `timeout` bounds the wait (a request's deadline): when it
    runs out the wait ends with ClusterTimeout and the call itself is left to finish (cancelling a
    coordinator mid-collective would wedge its ranks)."""

    async def forward(self, inputs: Any, *, timeout: float) -> Any: ...
    async def generate_batch(self, opens: Sequence[tuple[GenerationRequest, Any]], closes: Sequence[int],
                             sessions: Sequence[int], resync: bool, *, timeout: float) -> GenerationRound: ...
    def generate_rounds(self, stream: str, opens: Sequence[tuple[Any, GenerationRequest, Any]], closes: Sequence[int],
                        sessions: Sequence[int], resync: bool, *, timeout: float) -> AsyncIterator[GenerationRound]: ...
    async def generate_admit(self, stream: str, opens: Sequence[tuple[Any, GenerationRequest, Any]],
                             closes: Sequence[int], *, timeout: float) -> None: ...
    async def info(self, *, timeout: float) -> CoordinatorInfo: ...
    async def describe_ranks(self, *, timeout: float) -> list[dict[str, Any]]: ...
    async def health(self, *, timeout: float) -> list[int]: ...
    async def watch_health(self, version: int, wait_s: float, *, timeout: float) -> tuple[int, str | None]: ...


class AsyncCalls:
    """The AsyncCoordinatorHandle methods over one `_call(method, *args, timeout=...)`: a transport
    (a worker thread, a Ray actor call) implements only that."""

    async def _call(self, method: str, *args: Any, timeout: float) -> Any:
        raise NotImplementedError

    async def forward(self, inputs: Any, *, timeout: float) -> Any:
        return await self._call("forward", inputs, timeout=timeout)

    async def generate_batch(self, opens: Sequence, closes: Sequence[int], sessions: Sequence[int], resync: bool, *,
                             timeout: float) -> GenerationRound:
        return await self._call("generate_batch", opens, closes, sessions, resync, timeout=timeout)

    async def generate_admit(self, stream: str, opens: Sequence, closes: Sequence[int], *, timeout: float) -> None:
        await self._call("generate_admit", stream, opens, closes, timeout=timeout)

    async def info(self, *, timeout: float) -> CoordinatorInfo:
        return await self._call("info", timeout=timeout)

    async def describe_ranks(self, *, timeout: float) -> list[dict[str, Any]]:
        return await self._call("describe_ranks", timeout=timeout)

    async def health(self, *, timeout: float) -> list[int]:
        return await self._call("health", timeout=timeout)

    async def watch_health(self, version: int, wait_s: float, *, timeout: float) -> tuple[int, str | None]:
        """(version, why the replica is not serving or None) once it differs from `version`, else after
        `wait_s` (the coordinator's `watch_health`): a pool's long poll of one replica."""
        return await self._call("watch_health", version, wait_s, timeout=timeout)


class AsyncOverThreads(AsyncCalls):
    """`AsyncCoordinatorHandle` over a blocking handle, each call on a worker thread (in-process tests)."""

    def __init__(self, handle: CoordinatorHandle) -> None:
        self._handle = handle

    async def _call(self, method: str, *args: Any, timeout: float) -> Any:
        from cluster.errors import ClusterTimeout

        try:
            return await asyncio.wait_for(asyncio.to_thread(getattr(self._handle, method), *args), timeout)
        except asyncio.TimeoutError as exc:
            raise ClusterTimeout(f"coordinator {method} did not answer within {timeout:.1f} s") from exc

    def generate_rounds(self, stream: str, opens: Sequence, closes: Sequence[int], sessions: Sequence[int],
                        resync: bool, *, timeout: float) -> AsyncIterator[GenerationRound]:
        return _ThreadRounds(self._handle.generate_rounds(stream, opens, closes, sessions, resync), timeout)


class _ThreadRounds:
    """A blocking round stream as an async iterator, each round taken on a worker thread."""

    def __init__(self, rounds: Iterator[GenerationRound], timeout: float) -> None:
        self._rounds = rounds
        self._timeout = timeout

    def __aiter__(self) -> "_ThreadRounds":
        return self

    async def __anext__(self) -> GenerationRound:
        from cluster.errors import ClusterTimeout

        try:
            result = await asyncio.wait_for(asyncio.to_thread(next, self._rounds, None), self._timeout)
        except asyncio.TimeoutError as exc:
            raise ClusterTimeout(f"coordinator generate_rounds gave no round within {self._timeout:.1f} s") from exc
        if result is None:
            raise StopAsyncIteration
        return result


__all__ = ["AsyncCalls", "AsyncCoordinatorHandle", "AsyncOverThreads", "CoordinatorHandle", "CoordinatorInfo"]
