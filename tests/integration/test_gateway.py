"""The gRPC gateway over real rank actors: results, status codes, health, reflection, batching."""

import concurrent.futures as futures

import grpc
import numpy as np
import pytest
import torch

from actors.gateway.batching import BatchingConfig
from clients import errors
from clients.client import Client, to_tensor
from clients.protocol import inference_pb2 as pb
from clients.protocol import inference_pb2_grpc as pb_grpc
from cluster.models.bert import minilm_embedder, minilm_paraphrase, minilm_path
from cluster.models.defaults import ensure_defaults
from tests.integration.harness import GatewayThread

pytestmark = pytest.mark.integration

PARAPHRASE = ("The company HuggingFace is based in New York City", "HuggingFace's headquarters are situated in Manhattan")
UNRELATED = ("The company HuggingFace is based in New York City", "Apples are especially bad for your health")


@pytest.fixture(scope="module")
def folders(ray_cluster, tmp_path_factory):
    return ensure_defaults(tp_degree=2, batch_buckets=(1, 4), seq_buckets=(32,), root=tmp_path_factory.mktemp("defaults"))


@pytest.fixture(scope="module")
def gateway(folders):
    served = GatewayThread(folders, batching=BatchingConfig(max_batch_rows=4, max_wait_s=0.02))
    yield served
    served.close()


@pytest.fixture(scope="module")
def client(gateway):
    with Client(gateway.target, timeout=60) as c:
        yield c


def _tokens(texts):
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(minilm_path())(list(texts), padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


def test_embed_matches_in_process(client):
    texts = [PARAPHRASE[0], UNRELATED[1], "short"]
    got = client.embed(texts, model="minilm-embed")
    with torch.no_grad():
        expected = minilm_embedder(tensor_parallel=False)[0](*_tokens(texts))[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_classify_matches_in_process(client):
    results = client.classify([PARAPHRASE, UNRELATED], model="minilm-paraphrase")
    assert [r.label for r in results] == ["paraphrase", "different"]
    reference = minilm_paraphrase(tensor_parallel=False)[0]
    for pair, result in zip([PARAPHRASE, UNRELATED], results):
        a, b = _tokens([pair[0]]), _tokens([pair[1]])
        length = max(a[0].shape[1], b[0].shape[1])
        pad = lambda t: torch.nn.functional.pad(t, (0, length - t.shape[1]))  # noqa: E731
        with torch.no_grad():
            expected = reference(*map(pad, a), *map(pad, b))[0][0].numpy()
        np.testing.assert_allclose(result.logits, expected, atol=1e-3)


def test_raw_stubs_infer_health_and_reflection(gateway):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        listed = stub.ListModels(pb.ListModelsRequest(), timeout=30)
        assert sorted(m.name for m in listed.models) == ["minilm-embed", "minilm-paraphrase"]
        meta = stub.GetModel(pb.GetModelRequest(model="minilm-embed"), timeout=30)
        assert meta.task == "embed" and meta.tp_degree == 2 and len(meta.buckets) == 2 and meta.ready

        ids, mask, types = _tokens(["raw tensors in and out"])
        reply = stub.Infer(pb.InferRequest(model="minilm-embed", inputs=[to_tensor("ids", ids.numpy()),
                                                                         to_tensor("mask", mask.numpy()),
                                                                         to_tensor("types", types.numpy())]), timeout=60)
        out = np.frombuffer(reply.outputs[0].data, dtype="<f4").reshape(list(reply.outputs[0].shape))
        with torch.no_grad():
            expected = minilm_embedder(tensor_parallel=False)[0](ids, mask, types)[0].numpy()
        np.testing.assert_allclose(out[:1], expected, atol=1e-4)

        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "minilm-embed", "minilm-paraphrase"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == health_pb2.HealthCheckResponse.SERVING

        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        services = {s.name for answer in answers for s in answer.list_services_response.service}
        assert {"tpcluster.v1.Inference", "grpc.health.v1.Health"} <= services


def test_every_bad_request_gets_its_code_and_the_gateway_keeps_serving(gateway, client):
    bad = [
        (lambda: client.embed(["x"], model="nope"), errors.NotFound, "no model named 'nope'"),
        (lambda: client.embed([""], model="minilm-embed"), errors.InvalidArgument, "empty"),
        (lambda: client.embed([], model="minilm-embed"), errors.InvalidArgument, "empty"),
        (lambda: client.embed(["word " * 200], model="minilm-embed"), errors.InvalidArgument, "takes at most 32"),
        (lambda: client.classify([PARAPHRASE], model="minilm-embed"), errors.InvalidArgument, "serves 'embed'"),
        (lambda: client.classify(["only one text"], model="minilm-paraphrase"), errors.InvalidArgument, "text_pair"),
        (lambda: client.infer("minilm-embed", [np.zeros((1, 3), np.float32)]), errors.InvalidArgument, "match no bucket"),
        (lambda: client.embed(["x"], model="minilm-embed", timeout=0.0001), errors.DeadlineExceeded, ""),
    ]
    for call, error, text in bad:
        with pytest.raises(error, match=text):
            call()
    with grpc.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        lying = pb.Tensor(name="ids", dtype="int64", shape=[1, 4], data=b"\x00" * 8)
        with pytest.raises(grpc.RpcError) as info:
            stub.Infer(pb.InferRequest(model="minilm-embed", inputs=[lying]), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs 32 bytes, got 8" in info.value.details()
        weird = pb.Tensor(name="x", dtype="complex128", shape=[1], data=b"")
        with pytest.raises(grpc.RpcError) as info:
            stub.Infer(pb.InferRequest(model="minilm-embed", inputs=[weird]), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown dtype" in info.value.details()
    test_embed_matches_in_process(client)  # still correct afterwards


def test_concurrent_requests_share_forwards(gateway, client):
    before = _batched_rows(gateway)
    texts = [f"sentence number {i} about tensor parallel serving" for i in range(12)]
    with futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda t: client.embed([t], model="minilm-embed")[0], texts))
    together = client.embed(texts[:4], model="minilm-embed")
    np.testing.assert_allclose(np.stack(results[:4]), together, atol=1e-4)
    batches, rows = _batched_rows(gateway)
    assert rows - before[1] == 16 and batches - before[0] < 13  # 12 single-text requests + one of 4, in fewer forwards


def test_concurrent_infer_requests_share_forwards(gateway, client):
    """Raw-tensor requests of one shape are merged along the batch dimension and split back."""
    texts = [f"raw tensors for request {i}" for i in range(8)]
    encoded = [_tokens([t]) for t in texts]
    length = max(e[0].shape[1] for e in encoded)
    inputs = [[torch.nn.functional.pad(x, (0, length - x.shape[1])).numpy() for x in e] for e in encoded]
    alone = [client.infer("minilm-embed", tensors)[0] for tensors in inputs]
    before = _batched_rows(gateway)
    with futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda tensors: client.infer("minilm-embed", tensors)[0], inputs))
    for a, b in zip(alone, together):
        assert a.shape == b.shape == (1, 384)
        np.testing.assert_allclose(a, b, atol=1e-4)
    batches, rows = _batched_rows(gateway)
    assert rows - before[1] == 8 and batches - before[0] < 8


def _batched_rows(gateway, model="minilm-embed"):
    metric = gateway.gateway.metrics.batch_size.labels(model=model)
    samples = {s.name: s.value for s in metric.collect()[0].samples if s.name.endswith(("_count", "_sum"))}
    return samples["tpcluster_batch_rows_count"], samples["tpcluster_batch_rows_sum"]


def test_overload_is_resource_exhausted(folders):
    tight = GatewayThread({"minilm-embed": folders["minilm-embed"]}, batching=BatchingConfig(max_batch_rows=1, max_wait_s=0, max_queue=1))
    try:
        with Client(tight.target, timeout=60, retries=0) as c:
            def one(i):
                try:
                    return c.embed([f"text {i}"], model="minilm-embed").shape
                except errors.ResourceExhausted as exc:
                    return exc
            with futures.ThreadPoolExecutor(16) as pool:
                outcomes = list(pool.map(one, range(32)))
            refused = [o for o in outcomes if isinstance(o, errors.ResourceExhausted)]
            assert refused and "requests queued; retry later" in refused[0].details
            assert all(o == (1, 384) for o in outcomes if not isinstance(o, Exception))
            assert c.embed(["after the flood"], model="minilm-embed").shape == (1, 384)
    finally:
        tight.close()


def test_auth_tls_and_metrics(folders, tmp_path):
    import subprocess
    import urllib.request

    from actors.gateway.server import GatewayConfig

    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True)
    cert, key = (tmp_path / "cert.pem").read_bytes(), (tmp_path / "key.pem").read_bytes()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    secured = GatewayThread({"minilm-embed": folders["minilm-embed"]},
                            config=GatewayConfig(port=0, auth_token="s3cret", tls_cert=cert, tls_key=key,
                                                 metrics_port=metrics_port, health_interval_s=0.5))
    try:
        target = f"localhost:{secured.port}"
        for token in (None, "wrong"):
            with Client(target, token=token, root_certificates=cert, retries=0) as client:
                with pytest.raises(errors.Unauthenticated, match="bearer token"):
                    client.embed(["x"], model="minilm-embed")
                with pytest.raises(errors.Unauthenticated):
                    list(client.generate_stream("x", model="minilm-embed"))
                assert client.health() == "SERVING"  # probes stay open
        calls = secured.gateway.metrics.requests.labels("Embed", "minilm-embed", "OK")._value.get()
        assert calls == 0  # refused requests reached no model
        with Client(target, token="s3cret", root_certificates=cert) as client:
            assert client.embed(["over TLS"], model="minilm-embed").shape == (1, 384)
        with Client(f"127.0.0.1:{secured.port}", token="s3cret", retries=0) as plaintext:  # TLS is required
            with pytest.raises(errors.TpClusterError):
                plaintext.embed(["x"], model="minilm-embed", timeout=5)
        page = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'tpcluster_requests_total{code="OK",method="Embed",model="minilm-embed"} 1.0' in page
        assert "tpcluster_batch_rows_bucket" in page and "tpcluster_queue_depth" in page
    finally:
        secured.close()
