"""Client and AsyncClient against an in-process fake gateway: the same requests, the same decoded
results, the same retries (UNAVAILABLE until the deadline; a stream only before its first message)
and typed errors. No Ray, no models."""

import asyncio
import random
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from clients.client import AsyncClient, Client, GenerateStats, Generation
from clients.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from clients.protocol import inference_pb2 as pb
from clients.protocol import inference_pb2_grpc as pb_grpc
from clients.protocol.tensors import from_tensor, to_tensor
from clients.retry import RetryPolicy

UNAVAILABLE, EXHAUSTED = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED


class FakeGateway(pb_grpc.InferenceServicer):
    """Answers from the request alone. Embed and Generate first fail with each status in `failures`
    (one per call, before any token), or UNAVAILABLE `unavailable` times; a Generate stream breaks
    with UNAVAILABLE after `break_after` tokens while that is set."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.unavailable = 0
        self.failures: list[grpc.StatusCode] = []
        self.break_after: int | None = None
        self.calls: list[str] = []
        self.stall_s = 0.0  # a call that gets past the failures first waits this long

    def _fail_first(self, name: str, context) -> None:
        self.calls.append(name)
        if self.failures:
            context.abort(self.failures.pop(0), f"{name} failure {len(self.calls)}")
        if self.unavailable:
            self.unavailable -= 1
            context.abort(UNAVAILABLE, "warming up")
        time.sleep(self.stall_s)

    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[pb.ModelMetadata(name="a", task="embed"), pb.ModelMetadata(name="b")])

    def GetModel(self, request, context):
        if request.model != "a":
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model!r}")
        return pb.ModelMetadata(name="a", task="embed", tp_degree=2)

    def GetStatus(self, request, context):
        return pb.StatusResponse(gateway_version="fake")

    def Embed(self, request, context):
        self._fail_first("Embed", context)
        return pb.EmbedResponse(embeddings=[pb.Embedding(values=[len(t), 1.0]) for t in request.texts], dimensions=2)

    def Classify(self, request, context):
        return pb.ClassifyResponse(results=[pb.Classification(label=f"{i.text}|{i.text_pair}", label_id=len(i.text))
                                            for i in request.inputs])

    def Infer(self, request, context):
        return pb.InferResponse(outputs=[to_tensor(t.name, from_tensor(t) * 2) for t in request.inputs])

    def Generate(self, request, context):
        self._fail_first("Generate", context)
        for i, ch in enumerate(request.prompt[: request.max_new_tokens]):
            if i == self.break_after:
                context.abort(UNAVAILABLE, "replica lost mid-stream")
            yield pb.GenerateResponse(token=pb.GeneratedToken(id=i, text=ch.upper()))
        yield pb.GenerateResponse(stats=pb.GenerateStats(generated_tokens=min(len(request.prompt), request.max_new_tokens),
                                                         finish_reason="length", draft_tokens_proposed=request.speculation_length))


def _serve(fake: FakeGateway, address: str = "127.0.0.1:0") -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_InferenceServicer_to_server(fake, server)
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port(address)
    server.start()
    return server, port


@pytest.fixture(scope="module")
def _server():
    fake = FakeGateway()
    server, port = _serve(fake)
    yield fake, f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture
def gateway(_server):
    """The module's fake gateway, its failure settings and call log fresh for each test."""
    fake, target = _server
    fake.reset()
    yield fake, target
    fake.reset()


def _free_port() -> int:
    """A loopback port where nothing listens (bound, then closed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(target: str) -> dict:
    with Client(target, timeout=10) as c:
        return {
            "models": [m.name for m in c.list_models()], "model": c.get_model("a").tp_degree,
            "status": c.status().gateway_version, "embed": c.embed(["abc", "de"]),
            "classify": [(r.label, r.label_id) for r in c.classify(["x", ("yy", "z")])],
            "infer": c.infer("m", [np.arange(6, dtype=np.int32).reshape(2, 3), np.ones(2, dtype=">f4")]),
            "generate": c.generate("hello", max_new_tokens=3, speculation_length=4), "health": c.health(),
        }


async def _async(target: str) -> dict:
    async with AsyncClient(target, timeout=10) as c:
        return {
            "models": [m.name for m in await c.list_models()], "model": (await c.get_model("a")).tp_degree,
            "status": (await c.status()).gateway_version, "embed": await c.embed(["abc", "de"]),
            "classify": [(r.label, r.label_id) for r in await c.classify(["x", ("yy", "z")])],
            "infer": await c.infer("m", [np.arange(6, dtype=np.int32).reshape(2, 3), np.ones(2, dtype=">f4")]),
            "generate": await c.generate("hello", max_new_tokens=3, speculation_length=4), "health": await c.health(),
        }


def test_sync_and_async_clients_decode_the_same(gateway):
    _, target = gateway
    results = [_sync(target), asyncio.run(_async(target))]
    for got in results:
        assert got["models"] == ["a", "b"] and got["model"] == 2 and got["status"] == "fake" and got["health"] == "SERVING"
        assert got["embed"].dtype == np.float32 and got["embed"].tolist() == [[3.0, 1.0], [2.0, 1.0]]
        assert got["classify"] == [("x|", 1), ("yy|z", 2)]
        assert got["infer"][0].dtype == np.int32 and got["infer"][0].tolist() == [[0, 2, 4], [6, 8, 10]]
        assert got["infer"][1].dtype == np.float32 and got["infer"][1].tolist() == [2.0, 2.0]
        assert got["generate"] == Generation(text="HEL", token_ids=[0, 1, 2], stats=GenerateStats(
            generated_tokens=3, finish_reason="length", draft_tokens_proposed=4))


def test_unavailable_is_retried_and_other_errors_are_not(gateway):
    fake, target = gateway
    fake.unavailable, fake.calls = 2, []
    with Client(target, timeout=10, retries=3) as c:
        assert c.embed(["a"]).shape == (1, 2)
        assert len(fake.calls) == 3
        with pytest.raises(NotFound, match="no model 'zz'"):
            c.get_model("zz")
    fake.unavailable, fake.calls = 5, []

    async def exhaust():
        async with AsyncClient(target, timeout=10, retries=1) as c:
            await c.embed(["a"])

    with pytest.raises(Unavailable, match="warming up"):
        asyncio.run(exhaust())
    assert len(fake.calls) == 2
    fake.unavailable = 0


def test_unavailable_is_retried_until_the_deadline_not_a_fixed_count(gateway):
    fake, target = gateway
    fake.unavailable, fake.calls = 10, []  # a rebuild longer than the old 3 retries could wait
    fast = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.01)
    with Client(target, timeout=30, retry=fast) as c:
        assert c.embed(["abcd"]).tolist() == [[4.0, 1.0]]
    assert fake.calls == ["Embed"] * 11
    fake.unavailable, fake.calls = 10**6, []
    with Client(target, timeout=3, retry=fast) as c, pytest.raises(Unavailable, match="warming up"):
        c.embed(["a"])  # the last status is reported, not DEADLINE_EXCEEDED, whenever the deadline strikes
    assert len(fake.calls) > 1


def test_a_deadline_that_strikes_during_a_retry_reports_why_it_was_retrying(gateway):
    fake, target = gateway
    fake.unavailable, fake.stall_s = 1, 5.0  # the retry outlives the deadline
    fast = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.01)
    with Client(target, timeout=1.0, retry=fast) as c, pytest.raises(Unavailable, match="warming up .*until the call's deadline"):
        c.embed(["a"])
    assert fake.calls == ["Embed", "Embed"]


def test_nothing_listening_is_reported_at_once_not_retried_until_the_deadline():
    target = f"127.0.0.1:{_free_port()}"
    waits: list[str] = []
    with Client(target, timeout=60, on_wait=waits.append) as c:
        started = time.monotonic()
        with pytest.raises(Unavailable, match=rf"nothing answers at {target} .*Connection refused.*tpcluster serve"):
            c.status()
        assert time.monotonic() - started < 30  # reported after RetryPolicy.unreachable_s, not the 60 s deadline
        with pytest.raises(Unavailable, match="nothing answers"):
            c.health()

    brief = RetryPolicy(unreachable_s=0.3)

    async def unary() -> None:
        async with AsyncClient(target, timeout=60, retry=brief) as c:
            await c.list_models()

    with pytest.raises(Unavailable, match="nothing answers"):
        asyncio.run(unary())
    with Client(target, timeout=60, retry=brief) as c, pytest.raises(Unavailable, match="nothing answers"):
        c.generate("abc")


def test_a_gateway_reached_before_is_waited_for_through_a_restart(monkeypatch):
    """Refused connections from a gateway this client has reached are a restart: ridden out until it
    is back, with a line to `on_wait` once the wait passes WAIT_NOTICE_S."""
    monkeypatch.setattr("clients.client.WAIT_NOTICE_S", 0.2)
    fake = FakeGateway()
    server, port = _serve(fake)
    waits: list[str] = []
    policy = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.2, unreachable_s=0.1)
    with Client(f"127.0.0.1:{port}", timeout=60, retry=policy, on_wait=waits.append) as c:
        assert c.embed(["ab"]).tolist() == [[2.0, 1.0]]
        server.stop(None).wait()
        back = threading.Timer(1.0, lambda: restarted.append(_serve(fake, f"127.0.0.1:{port}")[0]))
        restarted: list[grpc.Server] = []
        back.start()
        try:
            assert c.embed(["abc"]).tolist() == [[3.0, 1.0]]
        finally:
            back.join()
            for s in restarted:
                s.stop(None)
    assert waits and "UNAVAILABLE" in waits[0] and "retrying for up to" in waits[0]


def test_resource_exhausted_is_retried_only_when_the_policy_says_so(gateway):
    fake, target = gateway
    fake.failures, fake.calls = [EXHAUSTED], []
    with Client(target, timeout=10) as c, pytest.raises(ResourceExhausted, match="Embed failure 1"):
        c.embed(["a"])
    assert fake.calls == ["Embed"]
    fake.failures, fake.calls = [EXHAUSTED, UNAVAILABLE, EXHAUSTED], []
    policy = RetryPolicy(initial_backoff_s=0.001, retryable_codes=frozenset({UNAVAILABLE, EXHAUSTED}))
    with Client(target, timeout=10, retry=policy) as c:
        assert c.embed(["ab"]).tolist() == [[2.0, 1.0]]
    assert fake.calls == ["Embed"] * 4
    fake.failures, fake.calls = [grpc.StatusCode.INVALID_ARGUMENT], []
    with Client(target, timeout=10, retry=policy) as c, pytest.raises(InvalidArgument):
        c.embed(["a"])
    assert fake.calls == ["Embed"]


def test_a_stream_is_retried_before_its_first_token_and_never_after(gateway):
    fake, target = gateway
    policy = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.01)
    fake.failures, fake.calls = [UNAVAILABLE, UNAVAILABLE], []
    with Client(target, timeout=10, retry=policy) as c:
        assert c.generate("abc", max_new_tokens=3).text == "ABC"
    assert fake.calls == ["Generate"] * 3
    fake.failures, fake.calls, fake.break_after = [UNAVAILABLE], [], 2
    seen: list[str] = []
    with Client(target, timeout=10, retry=policy) as c, pytest.raises(Unavailable, match="mid-stream"):
        for event in c.generate_stream("abcd", max_new_tokens=4):
            seen.append(event.token.text)
    assert seen == ["A", "B"] and fake.calls == ["Generate"] * 2  # one retry before the first token, no replay

    async def stream() -> list[str]:
        out: list[str] = []
        async with AsyncClient(target, timeout=10, retry=policy) as c:
            async for event in c.generate_stream("abcd", max_new_tokens=4):
                out.append(event.token.text)
        return out

    fake.failures, fake.calls, fake.break_after = [UNAVAILABLE], [], None
    assert asyncio.run(stream()) == ["A", "B", "C", "D", ""] and fake.calls == ["Generate"] * 2
    fake.calls, fake.break_after, seen = [], 1, []
    with pytest.raises(Unavailable, match="mid-stream"):
        asyncio.run(stream())
    assert fake.calls == ["Generate"]
    fake.break_after = None


def test_retry_policy_waits_full_jitter_under_a_capped_exponential_and_refuses_terminal_codes():
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0, max_retries=6)
    assert [policy.backoff(n) for n in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    rng, twin = random.Random(7), random.Random(7)
    delays = [policy.next_delay(UNAVAILABLE, n, 100.0, rng) for n in range(6)]
    assert delays == [twin.uniform(0.0, policy.backoff(n)) for n in range(6)]
    assert all(0.0 <= d <= policy.backoff(n) for n, d in enumerate(delays))
    assert policy.next_delay(UNAVAILABLE, 6, 100.0, rng) is None  # max_retries used up
    assert policy.next_delay(EXHAUSTED, 0, 100.0, rng) is None  # not in the default codes
    assert policy.next_delay(UNAVAILABLE, 0, 0.0, rng) is None  # no time left before the deadline
    assert RetryPolicy().max_retries is None and RetryPolicy().retryable_codes == {UNAVAILABLE}
    with pytest.raises(ValueError, match=r"cannot retry \['INVALID_ARGUMENT'\].*retry only"):
        RetryPolicy(retryable_codes=frozenset({UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT}))
    with pytest.raises(TypeError, match="a set of codes: pass frozenset"):
        RetryPolicy(retryable_codes=UNAVAILABLE)
    with pytest.raises(ValueError, match="initial_backoff_s <= max_backoff_s"):
        RetryPolicy(initial_backoff_s=2.0, max_backoff_s=1.0)
    with pytest.raises(ValueError, match="multiplier must be >= 1"):
        RetryPolicy(multiplier=0.5)
    with pytest.raises(ValueError, match="max_retries must be >= 0"):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ValueError, match="deadline in seconds"):
        Client("127.0.0.1:1", timeout=0)
    with Client("127.0.0.1:1", retries=0) as c:
        assert c.retry == RetryPolicy(max_retries=0)


def test_tensor_codec_round_trips_and_refuses_bad_payloads():
    big_endian = np.arange(4, dtype=">i8")
    assert from_tensor(to_tensor("x", big_endian)).tolist() == [0, 1, 2, 3]
    with pytest.raises(TypeError, match="cannot be sent"):
        to_tensor("c", np.ones(2, dtype=np.complex64))
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        from_tensor(pb.Tensor(dtype="int4", shape=[1], data=b"\0"))
    with pytest.raises(ValueError, match="negative dimension"):
        from_tensor(pb.Tensor(dtype="int8", shape=[-1], data=b""))
    with pytest.raises(ValueError, match="needs 8 bytes, got 4"):
        from_tensor(pb.Tensor(dtype="float32", shape=[2], data=b"\0" * 4))
