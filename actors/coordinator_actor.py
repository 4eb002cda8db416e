"""The coordinator as a Ray actor, and the driver-side handle that calls it with bounded waits.

`CoordinatorActor` hosts a cluster.coordinator.Coordinator over a RayRankGroup. `RemoteCoordinator`
is the typed handle (cluster.handle.CoordinatorHandle) that calls it: each method is one actor
call and one bounded wait, and Ray's wrapper errors are turned back into ours here, in one place.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any, AsyncIterator, Iterator, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.rank_group import RayRankGroup
from actors.runtime import NAMESPACE, SERVING_PROCESS_ENV, ensure_ray
from cluster.coordinator import Coordinator, CoordinatorConfig
from cluster.errors import ClusterError, ClusterTimeout, CoordinatorLost
from cluster.generation.types import GenerationRound
from cluster.handle import AsyncCalls, CoordinatorInfo
from cluster.trace.config import TraceSpec
from cluster.trace.state import Exported, ModelState

_GRACE_S = 5.0  # beyond a call's own timeout (enforced on the ranks), for the reply to travel
# glibc gives threads their own malloc arenas (up to 8 per core) and keeps what is freed in them: each
# rebuild reloads the shards (tens of MB of serialised arguments) and left that much resident in one
# more arena (issue 15, the shipped pair at TP=2: +32 MB per rebuild for 7 rebuilds; with 2 arenas
# +32 MB once, then flat). The coordinator's threads mostly wait on the ranks: 2 arenas are plenty.
COORDINATOR_PROCESS_ENV = {**SERVING_PROCESS_ENV, "MALLOC_ARENA_MAX": "2"}


# Threaded: a round stream (generate_rounds) runs beside the calls that feed it (generate_admit) and
# the control calls; the coordinator's lock (Coordinator.streams.lock) lets one of them in at a time.
@ray.remote(num_cpus=0, max_concurrency=8, max_restarts=0)
class CoordinatorActor:
    def __init__(self, tp_degree: int, config: CoordinatorConfig, group_name: str, label: dict | None = None,
                 node_ip: str | None = None) -> None:
        self._tp_degree = tp_degree
        self._config = config
        self._group_name = group_name
        self._label = dict(label or {})
        self._node_ip = node_ip
        self._coordinator: Coordinator | None = None
        self._creating = threading.Lock()

    def _ensure(self) -> Coordinator:
        with self._creating:
            if self._coordinator is None:  # ranks are created here, not in __init__, so errors reach the caller
                wait = self._config.placement_timeout_s
                calls, spares = self._config.rank_calls, self._config.spare_ranks
                first = RayRankGroup(self._tp_degree, wait, name=self._group_name, node_ip=self._node_ip,
                                     on_lost=self._rank_lost, rank_calls=calls, spares=spares)
                # a rebuild goes wherever the cores are: the first node may be the one that was lost
                factory = lambda: RayRankGroup(self._tp_degree, wait, name=self._group_name,  # noqa: E731
                                               on_lost=self._rank_lost, rank_calls=calls, spares=spares)
                self._coordinator = Coordinator(first, self._config, rank_group_factory=factory)
            return self._coordinator

    def _rank_lost(self, group: RayRankGroup, exc: Exception) -> None:
        coordinator = self._coordinator
        if coordinator is not None:
            coordinator.rank_lost(group, exc)

    def call(self, method: str, *args: Any) -> Any:
        coordinator = self._ensure()
        with coordinator.streams.lock:
            return getattr(coordinator, method)(*args)

    def generate_rounds(self, stream: str, opens: Sequence, closes: Sequence[int], sessions: Sequence[int],
                        resync: bool) -> Iterator[GenerationRound]:
        """A round stream (cluster.generation.rounds): each round is yielded as soon as it is made."""
        yield from self._ensure().generate_rounds(stream, opens, closes, sessions, resync)

    def watch_health(self, version: int, wait_s: float) -> tuple[int, str | None]:
        """Coordinator.watch_health, beside the serving calls (it takes no lock): a gateway's long poll."""
        coordinator = self._coordinator
        if coordinator is None:  # nothing loaded yet: nothing to watch
            time.sleep(min(wait_s, 1.0))
            return 0, "the replica holds no model yet"
        return coordinator.watch_health(version, wait_s)

    def identity(self) -> dict[str, Any]:
        """What a gateway or batch job checks before it adopts this resident replica."""
        return {"label": self._label, "group_name": self._group_name, "config": self._config,
                "loaded": self._coordinator is not None and self._coordinator.state is not None}

    def close(self) -> None:
        if self._coordinator is not None:
            with self._coordinator.streams.lock:
                self._coordinator.close()
            self._coordinator = None


def translate(exc: Exception, method: str) -> ClusterError:
    """Ray's wrapper errors, turned back into ours (the one place this happens for coordinators)."""
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if isinstance(cause, ClusterError):
            return cause
        return ClusterError(f"coordinator {method} failed: {exc}")
    return CoordinatorLost(f"the coordinator process died during {method}; the replica must be reloaded")


class RemoteCoordinator:
    """A CoordinatorHandle (cluster.handle) for a Coordinator living in a CoordinatorActor: each
    method is one actor call and one bounded wait. `aio` has the serving calls for asyncio."""

    def __init__(self, actor: Any, config: CoordinatorConfig, group_name: str = "", name: str | None = None) -> None:
        self._actor = actor
        self.config = config
        self.group_name = group_name
        self.name = name  # a resident (named, detached) coordinator's name
        self.aio = AsyncRemoteCoordinator(self)

    def _submit(self, method: str, args: tuple) -> Any:
        if self._actor is None:
            raise ClusterError("this model was closed; load it again")
        return self._actor.call.remote(method, *args)

    def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        timeout = timeout or self.config.call_timeout_s
        ref = self._submit(method, args)
        try:
            return ray.get(ref, timeout=timeout + _GRACE_S)
        except GetTimeoutError as exc:  # the call itself finishes on the coordinator; its result is dropped
            raise ClusterTimeout(f"coordinator {method} did not answer within {timeout:.0f} s") from exc
        except (RayTaskError, RayActorError) as exc:
            raise translate(exc, method) from exc

    def start(self) -> list[dict[str, Any]]:
        return self._call("start", timeout=self.config.rendezvous_timeout_s + self.config.call_timeout_s)

    def build(self, spec: TraceSpec, kernel: bytes | None) -> None:
        self._call("build", spec, kernel, timeout=self.config.trace_timeout_s)

    def trace_bucket(self, bucket: int, example: tuple) -> dict[str, Any]:
        return self._call("trace_bucket", bucket, example, timeout=self.config.trace_timeout_s)

    def finish_trace(self) -> None:
        self._call("finish_trace")

    def load(self, state: ModelState, graphs: Sequence[list[bytes]], weights: Sequence[dict | None],
             draft: tuple | None = None) -> None:
        self._call("load", state, graphs, weights, draft, timeout=self.config.trace_timeout_s)

    def export(self) -> Exported:
        return self._call("export", timeout=self.config.trace_timeout_s)

    def save(self, path: str) -> None:
        self._call("save", path, timeout=self.config.trace_timeout_s)

    def forward(self, inputs: Any) -> Any:
        return self._call("forward", inputs)

    def run(self, call: Any) -> Any:
        return self._call("run", call)

    def generate_open(self, request: Any, draft: Any = None) -> int:
        return self._call("generate_open", request, draft)

    def generate_step(self, session_id: int) -> Any:
        return self._call("generate_step", session_id)

    def generate_close(self, session_id: int) -> Any:
        return self._call("generate_close", session_id)

    def generate_batch(self, opens: Sequence = (), closes: Sequence[int] = (), sessions: Sequence[int] = (),
                       resync: bool = False) -> GenerationRound:
        return self._call("generate_batch", opens, closes, sessions, resync)

    def generate_rounds(self, stream: str, opens: Sequence = (), closes: Sequence[int] = (), sessions: Sequence[int] = (),
                        resync: bool = False) -> Iterator[GenerationRound]:
        """Rounds as the coordinator makes them; each waited for at most call_timeout_s."""
        if self._actor is None:
            raise ClusterError("this model was closed; load it again")
        rounds = self._actor.generate_rounds.options(num_returns="streaming").remote(stream, opens, closes, sessions, resync)
        timeout = self.config.call_timeout_s + _GRACE_S
        while True:
            ready, _ = ray.wait([rounds], timeout=timeout)
            if not ready:
                raise ClusterTimeout(f"coordinator generate_rounds gave no round within {timeout:.0f} s")
            try:
                ref = next(rounds)
            except StopIteration:
                return
            try:
                yield ray.get(ref, timeout=timeout)
            except (RayTaskError, RayActorError) as exc:
                raise translate(exc, "generate_rounds") from exc

    def generate_admit(self, stream: str, opens: Sequence = (), closes: Sequence[int] = ()) -> None:
        self._call("generate_admit", stream, opens, closes)

    def model_state(self) -> ModelState:
        return self._call("model_state")

    def weight_specs(self) -> list[dict[str, Any]]:
        return self._call("weight_specs")

    def replace_weights(self, states: Sequence[dict]) -> None:
        self._call("replace_weights", states)

    def info(self) -> CoordinatorInfo:
        return self._call("info")

    def rank_timings(self, reset: bool = False) -> list[dict[str, float]]:
        return self._call("rank_timings", reset, timeout=self.config.health_timeout_s)

    def compile_graphs(self, buckets: Sequence[int] | None = None) -> list[tuple[int, float, bool]]:
        return self._call("compile_graphs", buckets, timeout=self.config.trace_timeout_s)

    def describe_ranks(self) -> list[dict[str, Any]]:
        return self._call("describe_ranks", timeout=self.config.health_timeout_s)

    def describe_spares(self) -> list[dict[str, Any]]:
        return self._call("describe_spares", timeout=self.config.health_timeout_s)

    def health(self) -> list[int]:
        return self._call("health", timeout=self.config.health_timeout_s)

    def watch_health(self, version: int, wait_s: float) -> tuple[int, str | None]:
        """(version, why not serving or None) once it differs from `version`, else after wait_s."""
        if self._actor is None:
            raise ClusterError("this model was closed; load it again")
        ref = self._actor.watch_health.remote(version, wait_s)
        try:
            return ray.get(ref, timeout=wait_s + self.config.health_timeout_s)
        except GetTimeoutError as exc:
            raise ClusterTimeout(f"coordinator watch_health did not answer within {wait_s:.0f} s") from exc
        except (RayTaskError, RayActorError) as exc:
            raise translate(exc, "watch_health") from exc

    def rebuild_phases(self) -> dict[str, float]:
        return self._call("rebuild_phases", timeout=self.config.health_timeout_s)

    def close(self) -> None:
        if self._actor is None:
            return
        actor, self._actor = self._actor, None
        if not ray.is_initialized():
            return  # the cluster is gone, and the actors with it
        try:
            ray.get(actor.close.remote(), timeout=self.config.close_timeout_s)
        except Exception:  # a dead or stuck coordinator: killing it frees its ranks' cores
            pass
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already dead
            pass
        if self.group_name:  # a coordinator that died leaves its placement group behind
            from actors.rank_group import remove_orphaned_group

            remove_orphaned_group(self.group_name)
        if self.name:  # the name is free again only once Ray has seen the actor die
            deadline = time.monotonic() + 3 * self.config.close_timeout_s
            while time.monotonic() < deadline:
                try:
                    ray.get_actor(self.name, namespace=NAMESPACE)
                except ValueError:
                    break
                time.sleep(0.1)


class AsyncRemoteCoordinator(AsyncCalls):
    """The serving calls of a RemoteCoordinator, awaited without blocking the event loop (an
    AsyncCoordinatorHandle).

    When `timeout` runs out (a client's deadline) or the caller is cancelled, the wait ends
    (ClusterTimeout) and the result is dropped; the call itself is left to finish. Cancelling it
    in Ray would interrupt the coordinator, or with it a rank, inside a collective (seen: a rank
    died, a replica wedged). Work waiting for a batch is dropped before it is sent (the batcher),
    and a generation stops at its next step.
    """

    def __init__(self, remote: RemoteCoordinator) -> None:
        self._remote = remote

    def generate_rounds(self, stream: str, opens: Sequence, closes: Sequence[int], sessions: Sequence[int],
                        resync: bool, *, timeout: float) -> AsyncIterator[GenerationRound]:
        remote = self._remote
        if remote._actor is None:
            raise ClusterError("this model was closed; load it again")
        rounds = remote._actor.generate_rounds.options(num_returns="streaming").remote(stream, opens, closes, sessions,
                                                                                       resync)
        return _AsyncRounds(rounds, timeout)

    async def watch_health(self, version: int, wait_s: float, *, timeout: float) -> tuple[int, str | None]:
        """RemoteCoordinator.watch_health, awaited: the pool's long poll of one replica. The actor's own
        method, not `call`: the poll waits beside the serving calls, outside the coordinator's lock."""
        if self._remote._actor is None:
            raise ClusterError("this model was closed; load it again")
        return await self._wait(self._remote._actor.watch_health.remote(version, wait_s), "watch_health", timeout)

    async def _call(self, method: str, *args: Any, timeout: float) -> Any:
        return await self._wait(self._remote._submit(method, args), method, timeout)

    @staticmethod
    async def _wait(ref: Any, method: str, timeout: float) -> Any:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)
        except asyncio.TimeoutError as exc:
            raise ClusterTimeout(f"coordinator {method} did not answer within {timeout:.1f} s") from exc
        except (RayTaskError, RayActorError) as exc:
            raise translate(exc, method) from exc


class _AsyncRounds:
    """A Ray round stream as an async iterator; each round waited for at most `timeout`."""

    def __init__(self, rounds: Any, timeout: float) -> None:
        self._rounds = rounds
        self._timeout = timeout

    def __aiter__(self) -> "_AsyncRounds":
        return self

    async def __anext__(self) -> GenerationRound:
        try:
            ref = await asyncio.wait_for(self._rounds.__anext__(), self._timeout)
            return await asyncio.wait_for(asyncio.wrap_future(ref.future()), self._timeout)
        except asyncio.TimeoutError as exc:
            raise ClusterTimeout(f"coordinator generate_rounds gave no round within {self._timeout:.1f} s") from exc
        except (RayTaskError, RayActorError) as exc:
            raise translate(exc, "generate_rounds") from exc


def launch_coordinator(tp_degree: int, config: CoordinatorConfig, name: str | None = None, label: dict | None = None,
                       node_ip: str | None = None) -> RemoteCoordinator:
    """A coordinator actor. With `name` it is a named, detached actor in our namespace: it outlives
    the process that created it (a gateway, a batch job), which find it again with `actors.replicas.find_resident`."""
    ensure_ray()
    group_name = f"tpcluster-{uuid.uuid4().hex[:12]}"
    options: dict[str, Any] = {"runtime_env": {"env_vars": dict(COORDINATOR_PROCESS_ENV)}}
    if name:
        options.update(name=name, namespace=NAMESPACE, lifetime="detached")
    actor = CoordinatorActor.options(**options).remote(tp_degree, config, group_name, label, node_ip)
    return RemoteCoordinator(actor, config, group_name, name)
