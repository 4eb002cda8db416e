"""The gRPC gateway: grpc.aio server, thin servicers, one exception-to-status mapping.

Each method is decode (codec) -> model call (ServedModel) -> encode (codec). Errors are mapped to
status codes in `_status_of`, the only place that knows both our errors and gRPC's codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from actors.gateway import codec
from actors.gateway.metrics import GatewayMetrics
from actors.gateway.observed import (  # noqa: F401  (re-exported)
    ModelRegistry,
    ObservedServicer,
    _status_of,
    _version,
)
from actors.gateway.oip import OpenInferenceServicer
from actors.gateway.readiness import HealthServicer
from actors.gateway.served import ServedModel
from clients.protocol import OIP_SERVICE, SERVICE
from clients.protocol import grpc_predict_v2_pb2_grpc as oip_grpc
from clients.protocol import inference_pb2 as pb
from clients.protocol import inference_pb2_grpc as pb_grpc
from cluster.errors import InputError

log = logging.getLogger("tpcluster.gateway")
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 0  # 0: no metrics endpoint
    auth_token: str | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    grace_s: float = 10.0
    max_message_bytes: int = 64 << 20
    health_interval_s: float = 2.0
    default_deadline_s: float = 120.0  # a request that comes without a deadline gets this one

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key")


class InferenceServicer(ObservedServicer, pb_grpc.InferenceServicer):
    """tpcluster.v1. Each method: decode (codec) -> model call (ServedModel) -> encode (codec)."""

    async def ListModels(self, request, context):
        async def handler():
            return pb.ListModelsResponse(models=[codec.model_metadata(m) for m in self.registry.models.values()])
        return await self._unary("ListModels", request, context, handler)

    async def GetModel(self, request, context):
        async def handler():
            return codec.model_metadata(self.registry.get(request.model))
        return await self._unary("GetModel", request, context, handler)

    async def GetStatus(self, request, context):
        async def handler():
            models = []
            for m in self.registry.models.values():
                replicas = []
                for r in m.pool.replicas:
                    ranks, pid = await m.pool.describe(r)
                    replicas.append(codec.replica_status(r, ranks, pid, r.in_flight + m.generations_on(r)))
                models.append(pb.ModelStatus(name=m.name, task=m.spec.task, tp_degree=m.pool.info.tp_degree,
                                             queue_depth=m.queue_depth, replicas=replicas, generations=m.generations,
                                             prefix_hits=m.prefix_hits, prefix_reused_tokens=m.prefix_reused_tokens))
            return pb.StatusResponse(models=models, gateway_version=_version())
        return await self._unary("GetStatus", request, context, handler)

    async def Embed(self, request, context):
        async def handler():
            model = self.registry.get(request.model)
            return codec.embed_response(await model.embed(codec.decode_texts(request.texts), self._timeout(context)))
        return await self._unary("Embed", request, context, handler)

    async def Classify(self, request, context):
        async def handler():
            model = self.registry.get(request.model)
            results = await model.classify(codec.decode_pairs(request.inputs), self._timeout(context))
            return codec.classify_response(results)
        return await self._unary("Classify", request, context, handler)

    async def Infer(self, request, context):
        async def handler():
            model = self.registry.get(request.model)
            if not request.inputs:
                raise InputError("no input tensors; send the model's inputs (see GetModel)")
            named = [codec.decode_tensor(t, i) for i, t in enumerate(request.inputs)]
            return codec.infer_response(await model.infer(named, self._timeout(context)))
        return await self._unary("Infer", request, context, handler)

    async def Tokenize(self, request, context):
        async def handler():
            model = self.registry.get(request.model)
            texts, rows = codec.decode_tokenize(request)
            if texts is not None:
                return codec.tokenize_response(token_ids=model.tokenize(texts))
            return codec.tokenize_response(texts=model.detokenize(rows, request.skip_special_tokens))
        return await self._unary("Tokenize", request, context, handler)

    async def Generate(self, request, context):
        async with self._observed("Generate", request.model, context):
            model = self.registry.get(request.model)
            prompt, sampling = codec.decode_generate(request)
            draft = model.draft_named(sampling.draft_model, self.registry)
            stream = model.generate(prompt, sampling, draft, self._timeout(context))
            # A client that goes away while this handler waits to send leaves `stream` suspended, and
            # its cleanup (closing the session, freeing the replica) would wait for garbage
            # collection: close it as soon as the RPC ends, whatever way it ends.
            context.add_done_callback(lambda _: asyncio.ensure_future(_close_quietly(stream)))
            async with contextlib.aclosing(stream):
                async for token, piece in stream:
                    yield codec.generate_event(token, piece)


async def _close_quietly(stream: Any) -> None:
    try:
        await stream.aclose()
    except RuntimeError:  # running right now: the cancellation reaches it there and its cleanup runs
        pass


def _enable_reflection(server: grpc.aio.Server) -> None:
    """Server reflection as grpc.reflection.v1alpha and grpc.reflection.v1. grpcio-reflection
    implements only v1alpha; v1 is the same protocol under a new package name (its messages are
    wire-identical), so the v1 method is the v1alpha servicer behind v1's method path."""
    names = [SERVICE, OIP_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1]
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1}),))


class _AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer-token auth from the `authorization` metadata; health checks stay open for probes."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}"

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in 'authorization' metadata")

        self._deny = deny

    async def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return await continuation(details)
        import hmac

        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(sent.encode(), self._expected.encode()):
            return await continuation(details)
        handler = await continuation(details)
        if handler is not None and handler.response_streaming:
            async def deny_stream(request, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in 'authorization' metadata")
                yield  # pragma: no cover
            return grpc.unary_stream_rpc_method_handler(deny_stream, handler.request_deserializer, handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(self._deny, handler.request_deserializer if handler else None,
                                                   handler.response_serializer if handler else None)


class Gateway:
    """A running gateway: `await start()`, then `await stop()` (finishes in-flight requests within grace_s)."""

    def __init__(self, models: dict[str, ServedModel], config: GatewayConfig, metrics: GatewayMetrics | None = None) -> None:
        self.config = config
        self.registry = ModelRegistry(models)
        self.metrics = metrics or GatewayMetrics()
        self.readiness = self.registry.readiness
        self.health = HealthServicer(self.readiness)
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_server = None
        self._health_task: asyncio.Task | None = None
        self._publishing: set[asyncio.Task] = set()  # health publications under way (kept referenced)
        self.servicer = InferenceServicer(self.registry, self.metrics, config.default_deadline_s)
        self.oip = OpenInferenceServicer(self.registry, self.metrics, config.default_deadline_s)

    async def start(self) -> int:
        options = [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.max_send_message_length", self.config.max_message_bytes),
            ("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        interceptors = [_AuthInterceptor(self.config.auth_token)] if self.config.auth_token else []
        server = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_InferenceServicer_to_server(self.servicer, server)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(self.oip, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        _enable_reflection(server)
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls_cert is not None:
            creds = grpc.ssl_server_credentials([(self.config.tls_key, self.config.tls_cert)])
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        await server.start()  # its first answers: every model NOT_SERVING (loading), the gateway too
        self._server = server
        self.readiness.open()
        for name, model in self.registry.models.items():
            try:
                await model.describe_outputs()
            except Exception:  # metadata without outputs; serving goes on
                log.exception("model %s: could not learn its outputs from a forward on zeros", name)
        if self.config.metrics_port:
            self._metrics_server = self.metrics.serve(self.config.host, self.config.metrics_port)
        await self._refresh_health()
        for model in self.registry.models.values():  # changes pushed by the replicas, as they happen
            model.pool.watch(self._health_changed)
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop())
        log.info(json.dumps({"event": "serving", "address": f"{self.config.host}:{self.port}",
                             "models": sorted(self.registry.models), "tls": self.config.tls_cert is not None,
                             "auth": bool(self.config.auth_token)}))
        return self.port

    async def _refresh_health(self) -> None:
        for model in self.registry.models.values():
            await model.pool.check_health()
            self.metrics.queue_depth.labels(model.name).set(model.queue_depth)
        await self._publish_health()

    def _health_changed(self) -> None:
        """A pool saw a replica lost or back: publish at once (Health.Watch streams see it now), and
        wake the Generate schedulers holding requests that wait for a replica."""
        for model in self.registry.models.values():
            for scheduler in model.schedulers:
                if scheduler.waiting:
                    scheduler.wake()
        task = asyncio.get_running_loop().create_task(self._publish_health())
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _publish_health(self) -> None:
        """Each model's readiness as its pool knows it now (the gateway's follows: any model ready)."""
        for name, model in self.registry.models.items():
            ready = model.pool.ready
            self.readiness.publish(name, ready)
            self.metrics.ready.labels(name).set(1 if ready else 0)

    async def _health_loop(self) -> None:
        """A backstop behind the pushed changes: asks every replica's ranks every health_interval_s."""
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self._refresh_health()
            except Exception:  # health reporting must never take the gateway down
                log.exception("health refresh failed")

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    async def stop(self) -> None:
        if self._health_task:
            self._health_task.cancel()
        self.readiness.close()
        if self._server is not None:
            await self._server.stop(self.config.grace_s)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        for model in self.registry.models.values():
            await model.batcher.close()
