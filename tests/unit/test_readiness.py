"""Every health surface of a starting, serving and stopping gateway tells the same truth: gRPC health
("" and per model, Check and Watch), the Open Inference Protocol's ServerReady/ModelReady and the
OpenAI HTTP API's /health. A real gateway (grpc.aio server, uvicorn) over fake models whose
`describe_outputs` the test holds, so the window between the server's first answer and its first
ready model is as long as the test wants. No Ray, no torch models."""

import asyncio
import json
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from actors.gateway.openai_http import OpenAIServer
from actors.gateway.readiness import NOT_SERVING, SERVICE_UNKNOWN, SERVING, Readiness
from actors.gateway.server import Gateway, GatewayConfig
from clients.protocol import grpc_predict_v2_pb2 as oip
from clients.protocol import grpc_predict_v2_pb2_grpc as oip_grpc

NAMES = ("a", "b")


class _Pool:
    def __init__(self) -> None:
        self.ready = True
        self.replicas: list = []
        self.watchers: list = []

    async def check_health(self) -> bool:
        return self.ready

    def watch(self, callback) -> None:
        self.watchers.append(callback)


class _Batcher:
    async def close(self) -> None:
        pass


class _Model:
    """What the gateway asks of a served model at start, in its health loop and at stop."""

    def __init__(self, name: str, loaded: asyncio.Event) -> None:
        self.name, self.loaded = name, loaded
        self.pool = _Pool()
        self.schedulers: list = []
        self.queue_depth = 0
        self.batcher = _Batcher()

    async def describe_outputs(self) -> None:
        await self.loaded.wait()  # the gateway is up and answering; this model is still "loading"


async def _surfaces(gateway: Gateway, http_port: int) -> dict:
    """One reading of every surface."""
    target = f"127.0.0.1:{gateway.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        checker = health_pb2_grpc.HealthStub(channel)
        names = {service: health_pb2.HealthCheckResponse.ServingStatus.Name(
            (await checker.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)).status)
            for service in ("",) + NAMES}
        inference = oip_grpc.GRPCInferenceServiceStub(channel)
        server_ready = (await inference.ServerReady(oip.ServerReadyRequest(), timeout=10)).ready
        model_ready = {n: (await inference.ModelReady(oip.ModelReadyRequest(name=n), timeout=10)).ready for n in NAMES}

    def get_health() -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=10) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, body = await asyncio.to_thread(get_health)
    return {"grpc": names, "server_ready": server_ready, "model_ready": model_ready,
            "http": (status, body["ready_models"])}


def _all_not_ready() -> dict:
    return {"grpc": {"": "NOT_SERVING", "a": "NOT_SERVING", "b": "NOT_SERVING"}, "server_ready": False,
            "model_ready": {"a": False, "b": False}, "http": (503, [])}


async def _lifecycle() -> tuple[list[dict], list[str]]:
    loaded = asyncio.Event()
    models = {name: _Model(name, loaded) for name in NAMES}
    gateway = Gateway(models, GatewayConfig(port=0, health_interval_s=3600))  # changes are pushed; no backstop poll
    http = OpenAIServer(gateway, 0)
    http_port = await http.start()
    starting = asyncio.get_running_loop().create_task(gateway.start())
    while gateway._server is None:  # the gRPC server answers from here on
        await asyncio.sleep(0.01)
    readings = [await _surfaces(gateway, http_port)]

    watched: list[str] = []
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))

    async def follow() -> None:
        async for reply in watch:
            watched.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    following = asyncio.get_running_loop().create_task(follow())
    while not watched:
        await asyncio.sleep(0.01)
    readings.append(await _surfaces(gateway, http_port))  # still loading

    loaded.set()
    await starting
    readings.append(await _surfaces(gateway, http_port))  # both ready

    models["b"].pool.ready = False  # a replica lost: the pool pushes the change
    for callback in models["b"].pool.watchers:
        callback()
    while gateway._publishing:
        await asyncio.sleep(0.01)
    readings.append(await _surfaces(gateway, http_port))

    gateway.readiness.close()  # what stop() does first: the grace period serves, but reports not ready
    readings.append(await _surfaces(gateway, http_port))
    while len(watched) < 3:
        await asyncio.sleep(0.01)
    watch.cancel()
    following.cancel()
    await channel.close()
    await http.stop()
    await gateway.stop()
    return readings, watched


def test_every_surface_agrees_from_the_first_answer_to_the_shutdown():
    readings, watched = asyncio.run(asyncio.wait_for(_lifecycle(), 120))
    assert readings[0] == readings[1] == _all_not_ready()  # models known (not NOT_FOUND), none ready yet
    assert readings[2] == {"grpc": {"": "SERVING", "a": "SERVING", "b": "SERVING"}, "server_ready": True,
                           "model_ready": {"a": True, "b": True}, "http": (200, ["a", "b"])}
    assert readings[3] == {"grpc": {"": "SERVING", "a": "SERVING", "b": "NOT_SERVING"}, "server_ready": True,
                           "model_ready": {"a": True, "b": False}, "http": (200, ["a"])}
    assert readings[4] == _all_not_ready()
    assert watched == ["NOT_SERVING", "SERVING", "NOT_SERVING"]


def test_readiness_record():
    readiness = Readiness(["m"])
    assert readiness.status("") == NOT_SERVING and readiness.status("m") == NOT_SERVING
    assert readiness.status("other") == SERVICE_UNKNOWN
    readiness.publish("m", True)
    assert not readiness.server  # published, but the server does not accept yet
    readiness.open()
    assert readiness.server and readiness.status("m") == SERVING and readiness.ready_models() == ["m"]
    readiness.close()
    readiness.open()  # a closed gateway stays closed
    assert not readiness.server and readiness.ready_models() == []
    version = readiness.version
    readiness.publish("m", False)
    assert readiness.version == version + 1
