"""What the gateway says about its readiness, kept in one record that every health surface reads.

Four surfaces answer "is it ready": standard gRPC health (`grpc.health.v1.Health`, service "" for
the gateway and the model's name for one model), the Open Inference Protocol's `ServerReady` and
`ModelReady`, and the OpenAI HTTP API's `GET /health`. They all read `Readiness`, so they agree at
every moment: a model is ready once the gateway has published it ready (its pool has a ready
replica and the gateway has learned its outputs), the gateway once any model is; nothing is while
the gateway starts or after its graceful shutdown begins. Every served model's status exists from
the server's first answer (NOT_SERVING until then), so a probe never reads NOT_FOUND for a model
that is only loading.

`HealthServicer` is grpc.health.v1 over that record (grpcio-health-checking's own servicer starts
with "" = SERVING and keeps its own copy of the states, which is what this replaces).
"""

from __future__ import annotations

import asyncio
from typing import Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Readiness:
    """The gateway's readiness and each model's, as published (see the module docstring)."""

    def __init__(self, models: Iterable[str]) -> None:
        self._ready = dict.fromkeys(models, False)
        self._accepting = False  # set by open(); cleared for good by close()
        self._closed = False
        self.version = 0  # counts changes, so a watcher that was busy when one happened still sees it
        self._changed: asyncio.Condition | None = None  # made in the serving loop on first use

    def open(self) -> None:
        """The server accepts requests: each model's published state now counts."""
        if not self._closed:
            self._accepting = True
            self._notify()

    def close(self) -> None:
        """Graceful shutdown began: nothing is ready any more, whatever is published later."""
        self._accepting, self._closed = False, True
        self._notify()

    def publish(self, model: str, ready: bool) -> None:
        if model not in self._ready:
            raise KeyError(f"no model named {model!r}; served models: {sorted(self._ready)}")
        if self._ready[model] != ready:
            self._ready[model] = ready
            self._notify()

    def model(self, name: str) -> bool:
        return self._accepting and self._ready.get(name, False)

    @property
    def server(self) -> bool:
        """Ready for requests: accepting, and at least one model ready."""
        return self._accepting and any(self._ready.values())

    def ready_models(self) -> list[str]:
        return sorted(name for name, ready in self._ready.items() if ready) if self._accepting else []

    def knows(self, service: str) -> bool:
        return service == "" or service in self._ready

    def status(self, service: str) -> int:
        """grpc.health.v1's status of `service` ("" the gateway, else a model's name)."""
        if not self.knows(service):
            return SERVICE_UNKNOWN
        ready = self.server if service == "" else self.model(service)
        return SERVING if ready else NOT_SERVING

    def _notify(self) -> None:
        self.version += 1
        if self._changed is None:
            return
        changed = self._changed

        async def wake() -> None:
            async with changed:
                changed.notify_all()

        try:
            asyncio.get_running_loop().create_task(wake())
        except RuntimeError:  # no loop running here (a test, or shutdown): nobody can be watching
            pass

    async def wait_for_change(self, version: int) -> None:
        """Returns once `self.version` differs from `version`."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            await self._changed.wait_for(lambda: self.version != version)


class HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 Check and Watch, answered from a `Readiness`."""

    def __init__(self, readiness: Readiness) -> None:
        self.readiness = readiness

    async def Check(self, request, context):
        if not self.readiness.knows(request.service):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}: ask about \"\" "
                                                           f"(the gateway) or a served model's name")
        return health_pb2.HealthCheckResponse(status=self.readiness.status(request.service))

    async def Watch(self, request, context):
        """A status at once, then each change (the health protocol's Watch: SERVICE_UNKNOWN for a
        name that is not served, and the stream stays open)."""
        last = None
        while True:
            version = self.readiness.version
            status = self.readiness.status(request.service)
            if status != last:
                last = status
                await context.write(health_pb2.HealthCheckResponse(status=status))
            await self.readiness.wait_for_change(version)
