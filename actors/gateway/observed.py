"""What every servicer of the gateway shares: the model registry, the one exception-to-status
mapping (`_status_of`), and `ObservedServicer._observed` around each RPC (status codes, metrics, a
JSON log line). tpcluster.v1 (actors.gateway.server) and the Open Inference Protocol
(actors.gateway.oip) both build on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any

import grpc

from actors.gateway.metrics import GatewayMetrics
from actors.gateway.readiness import Readiness
from actors.gateway.served import ServedModel
from cluster.errors import ClusterError, ClusterTimeout, ModelNotFound

log = logging.getLogger("tpcluster.gateway")


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code of an exception: our errors name theirs (ClusterError.status); a wait that
    ran out is DEADLINE_EXCEEDED wherever it happened; anything else is INTERNAL."""
    if isinstance(exc, (asyncio.TimeoutError, ClusterTimeout)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "the request did not finish before its deadline"
    if isinstance(exc, ClusterError):
        return grpc.StatusCode[exc.status], str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the gateway log"


class ModelRegistry:
    """The served models by name, and what the gateway says of their readiness (one record that
    every health surface reads: actors.gateway.readiness)."""

    def __init__(self, models: dict[str, ServedModel]) -> None:
        self.models = models
        self.readiness = Readiness(models)

    def get(self, name: str) -> ServedModel:
        if not name and len(self.models) == 1:
            return next(iter(self.models.values()))
        try:
            return self.models[name]
        except KeyError as exc:
            raise ModelNotFound(f"no model named {name!r}; served models: {sorted(self.models)}") from exc


class ObservedServicer:
    """What every servicer of the gateway shares: the models, the deadline a request gets, and
    `_observed` around each RPC (status codes, metrics, the log line). tpcluster.v1 and the Open
    Inference Protocol (actors.gateway.oip) are both one."""

    def __init__(self, registry: ModelRegistry, metrics: GatewayMetrics, default_deadline_s: float) -> None:
        self.registry = registry
        self.metrics = metrics
        self.default_deadline_s = default_deadline_s

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self.default_deadline_s if remaining is None else max(0.0, remaining)

    @contextlib.asynccontextmanager
    async def _observed(self, method: str, model: str, context: grpc.aio.ServicerContext):
        """Around every RPC: errors to status codes (the one place), metrics, a JSON log line with a request id."""
        request_id = dict(context.invocation_metadata()).get("x-request-id") or uuid.uuid4().hex[:16]
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, message = _status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("request %s %s failed", request_id, method)
            await context.abort(code, message)
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(method, model, code.name).inc()
            self.metrics.latency.labels(method, model).observe(elapsed)
            log.info(json.dumps({"request_id": request_id, "method": method, "model": model, "code": code.name,
                                 "ms": round(elapsed * 1e3, 2)}))

    async def _unary(self, method: str, request: Any, context: grpc.aio.ServicerContext, handler, model: str | None = None) -> Any:
        async with self._observed(method, getattr(request, "model", "") if model is None else model, context):
            return await handler()



def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tpcluster")
    except PackageNotFoundError:
        return "unknown"


