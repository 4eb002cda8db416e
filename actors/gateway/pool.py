"""The control plane of one served model: its replicas, which are ready, routing, loss, recreation
and health. The data path (actors.gateway.served) asks it for a replica and reports losses; it
never decides where a request goes or how a replica comes back.

A lost rank is rebuilt by the replica's own coordinator, which pushes its health (lost,
rebuilding, ready) to a long poll the pool keeps on it (`watch`); a lost coordinator (its ranks
die with it) is recreated here from the saved model, under the same name when resident, with
`CoordinatorConfig.rebuild_backoff` between attempts.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

from actors.replicas import Placement, adopt_or_launch, launch_replica, replica_name, resident_replicas
from cluster.coordinator_config import CoordinatorConfig
from cluster.errors import ClusterTimeout, CoordinatorLost, ModelUnavailable, RankFailure
from cluster.handle import AsyncCoordinatorHandle, CoordinatorHandle, CoordinatorInfo
from cluster.trace import artifact

log = logging.getLogger("tpcluster.gateway")
T = TypeVar("T")
WATCH_WAIT_S = 30.0  # a replica's health long poll returns at a change, else after this
WATCH_RETRY_S = 0.5  # after a failed long poll


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(eq=False)
class Replica:
    index: int
    coordinator: CoordinatorHandle  # a RemoteCoordinator on the cluster
    ready: bool = True
    in_flight: int = 0
    error: str = ""
    recoveries: int = 0
    recreating: asyncio.Task | None = None  # recreating a lost coordinator
    adopted: bool = False  # a resident replica found loaded, rather than loaded by this process


class ReplicaPool:
    """The replicas of one model. `load` (blocking) adopts or launches them; `pick` routes;
    `run` makes one call on a replica, takes a lost one out of rotation at once and moves the
    call to another ready replica once."""

    def __init__(self, model: str, folder: Path | None, replicas: list[Replica], resident: bool) -> None:
        if not replicas:
            raise ValueError(f"model {model!r} has no replicas")
        self.model = model
        self.folder = folder
        self.replicas = replicas
        self.resident = resident  # replicas are named and detached: recreated under the same name
        self.config: CoordinatorConfig = replicas[0].coordinator.config
        self.info: CoordinatorInfo = replicas[0].coordinator.info()
        self._on_change: Callable[[], None] | None = None
        self._watchers: list[asyncio.Task] = []

    @classmethod
    def load(cls, model: str, folder: Path, count: int, resident: bool,
             config: CoordinatorConfig | None = None) -> "ReplicaPool":
        """`count` replicas of the saved model in `folder`: resident ones adopted where they hold this
        very folder, the others launched (with `config`) on nodes that hold no replica of the model yet."""
        placement = Placement()
        replicas = []
        for index in range(count):
            coordinator, adopted = adopt_or_launch(model, folder, index, placement, resident, config)
            if adopted:
                log.info("model %s replica %d: adopted the resident replica", model, index)
            replicas.append(Replica(index, coordinator, adopted=adopted))
        log.info("model %s from %s: %d replica(s) on %s", model, folder, count, sorted(placement.nodes) or "one node")
        return cls(model, folder, replicas, resident)

    @classmethod
    def adopt_resident(cls, model: str, folder: Path | None = None) -> "ReplicaPool | None":
        """The resident replicas of `model` (a gateway's, on this cluster) that hold exactly the saved
        model in `folder` (default: the folder they were loaded from, as it is now); None when none do.
        The same manifest-digest check as a gateway's adoption: stale shards are never served."""
        found = resident_replicas(model)
        if not found:
            return None
        folder = Path(folder or found[0][1]["path"])
        digest = artifact.digest(folder)
        held = [coordinator for coordinator, label in found if label.get("manifest") == digest]
        if not held:
            log.warning("model %s: no resident replica holds %s as it is now", model, folder)
            return None
        return cls(model, folder, [Replica(i, c, adopted=True) for i, c in enumerate(held)], resident=True)

    # -- routing ----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return any(r.ready for r in self.replicas)

    @property
    def ready_count(self) -> int:
        return sum(r.ready for r in self.replicas)

    def unavailable(self) -> ModelUnavailable:
        return ModelUnavailable(f"model {self.model!r} has no ready replica right now; retry shortly")

    def pick(self) -> Replica:
        """The ready replica with the fewest calls in flight."""
        ready = [r for r in self.replicas if r.ready]
        if not ready:
            raise self.unavailable()
        return min(ready, key=lambda r: r.in_flight)

    async def run(self, call: Callable[[AsyncCoordinatorHandle], Awaitable[T]], replica: Replica | None = None,
                  deadline: float | None = None) -> T:
        """`call(handle)` on `replica`, or on the replica `pick()` chooses. A lost rank or coordinator
        takes the replica out of rotation at once. A call the pool routed itself is then made once
        more on another ready replica, if one exists and the event loop's clock is before `deadline`
        (None: no bound here; the caller's own wait bounds it), so a request that met a loss still
        succeeds; otherwise the loss is UNAVAILABLE to the caller. `call` must be safe to repeat (a
        stateless forward); a call pinned to `replica` (it holds state there) is never moved."""
        chosen = replica or self.pick()
        try:
            return await self._run_on(chosen, call)
        except ModelUnavailable as exc:
            if replica is not None or not self.ready:
                raise
            if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                raise
            other = self.pick()  # `chosen` is out of rotation now, so this is another replica
            log.info("model %s: retrying a call lost on replica %d on replica %d", self.model, chosen.index, other.index)
            try:
                return await self._run_on(other, call)
            except ModelUnavailable as again:
                raise again from exc

    async def _run_on(self, replica: Replica, call: Callable[[AsyncCoordinatorHandle], Awaitable[T]]) -> T:
        replica.in_flight += 1
        try:
            return await call(replica.coordinator.aio)
        except (ModelUnavailable, RankFailure) as exc:
            self.lost(replica, exc)
            raise ModelUnavailable(f"model {self.model!r} replica {replica.index}: {first_line(exc)}") from exc
        finally:
            replica.in_flight -= 1

    # -- loss and recovery ------------------------------------------------------------------
    def lost(self, replica: Replica, exc: BaseException) -> None:
        if replica.ready:
            log.warning("model %s replica %d lost: %s", self.model, replica.index, first_line(exc))
            replica.ready = False
            self._changed()
        replica.error = first_line(exc)
        if isinstance(exc, CoordinatorLost) and replica.recreating is None and self.folder is not None:
            replica.recreating = asyncio.get_running_loop().create_task(self._recreate(replica))

    async def _recreate(self, replica: Replica) -> None:
        """Load the replica again from its saved model (its coordinator died, and its ranks with it)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, replica.coordinator.close)  # frees what the dead coordinator held
        name = replica_name(self.model, replica.index) if self.resident else None
        try:
            for delay in self.config.rebuild_backoff.delays():
                try:
                    replica.coordinator = await loop.run_in_executor(
                        None, lambda: launch_replica(self.folder, self.config, name=name))
                    replica.error = ""
                    self._back(replica, "recreated")
                    return
                except Exception as exc:  # capacity may come back: keep trying
                    replica.error = f"recreating: {first_line(exc)}"
                    await asyncio.sleep(delay)
        finally:
            replica.recreating = None

    async def check_health(self) -> bool:
        """Ask every replica's ranks; a replica that answers again is back in rotation."""
        for replica in self.replicas:
            if replica.recreating is not None:
                continue
            try:
                await replica.coordinator.aio.health(timeout=self.config.health_timeout_s)
                replica.error = ""
                self._back(replica, "ready again")  # the coordinator rebuilt its ranks
            except (ModelUnavailable, RankFailure) as exc:
                self.lost(replica, exc)
            except ClusterTimeout:  # busy (a long generation step), not lost: a failure shows as an error
                log.info("model %s replica %d: health check timed out (busy)", self.model, replica.index)
            except Exception as exc:  # any other failure: do not route requests here
                replica.ready, replica.error = False, first_line(exc)
        return self.ready

    def _back(self, replica: Replica, how: str) -> None:
        if not replica.ready:
            replica.ready = True
            replica.recoveries += 1
            log.warning("model %s replica %d %s", self.model, replica.index, how)
            self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    # -- pushed health ----------------------------------------------------------------------
    def watch(self, on_change: Callable[[], None]) -> None:
        """Follow each replica's health as its coordinator reports it: a loss, a rebuild's end and a
        lost coordinator are seen the moment they happen (one long poll per replica, no polling
        interval); `on_change()` is called whenever the model's readiness may have changed. Runs
        in the running event loop until `close`."""
        self._on_change = on_change
        loop = asyncio.get_running_loop()
        self._watchers = [loop.create_task(self._watch(replica)) for replica in self.replicas]

    async def _watch(self, replica: Replica) -> None:
        version, watched = -1, None
        while True:
            if replica.recreating is not None:
                await asyncio.wait({replica.recreating})
            if replica.coordinator is not watched:
                version, watched = -1, replica.coordinator
            try:
                version, broken = await watched.aio.watch_health(
                    version, WATCH_WAIT_S, timeout=WATCH_WAIT_S + self.config.health_timeout_s)
            except ClusterTimeout:  # a busy coordinator: ask again
                continue
            except CoordinatorLost as exc:
                if replica.coordinator is watched:
                    self.lost(replica, exc)  # starts its recreation
                await asyncio.sleep(WATCH_RETRY_S)
                continue
            except Exception as exc:  # noqa: BLE001 - the watch must outlive any one failure
                log.info("model %s replica %d: health watch failed (%s)", self.model, replica.index, first_line(exc))
                await asyncio.sleep(WATCH_RETRY_S)
                continue
            if broken is None:
                replica.error = ""
                self._back(replica, "ready again")
            else:
                self.lost(replica, ModelUnavailable(broken))

    async def describe(self, replica: Replica) -> tuple[list[dict[str, Any]], int]:
        """(ranks, coordinator pid) of a ready replica, for status; ([], 0) when it does not answer."""
        if not replica.ready:
            return [], 0
        timeout = self.config.health_timeout_s
        try:
            ranks = await replica.coordinator.aio.describe_ranks(timeout=timeout)
            info = await replica.coordinator.aio.info(timeout=timeout)
        except Exception:  # status must answer even when a replica does not
            return [], 0
        return ranks, info.pid

    async def close(self, release: bool = True) -> None:
        """Stop recreating; `release` also unloads the replicas (resident ones otherwise stay loaded)."""
        watchers, self._watchers, self._on_change = self._watchers, [], None
        for watcher in watchers:
            watcher.cancel()
        if watchers:  # let them finish cancelling before the loop may close
            await asyncio.wait(watchers, timeout=WATCH_RETRY_S)
        for replica in self.replicas:
            if replica.recreating is not None:
                replica.recreating.cancel()
            if release:
                replica.coordinator.close()
