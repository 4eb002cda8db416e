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
from tests.integration.harness import GatewayThread
from tests.support import free_port, minilm_embeddings, minilm_tokens, paraphrase_logits

pytestmark = pytest.mark.integration

PARAPHRASE = ("The company HuggingFace is based in New York City", "HuggingFace's headquarters are situated in Manhattan")
UNRELATED = ("The company HuggingFace is based in New York City", "Apples are especially bad for your health")


@pytest.fixture(scope="module")
def folders(minilm_tp2):
    return minilm_tp2


@pytest.fixture(scope="module")
def gateway(folders):
    served = GatewayThread(folders, batching=BatchingConfig(max_batch_rows=4, max_wait_s=0.02))
    yield served
    served.close()


@pytest.fixture(scope="module")
def client(gateway):
    with Client(gateway.target, timeout=60) as c:
        yield c




def test_embed_matches_in_process(client):
    texts = [PARAPHRASE[0], UNRELATED[1], "short"]
    got = client.embed(texts, model="minilm-embed")
    np.testing.assert_allclose(got, minilm_embeddings(texts), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_classify_matches_in_process(client):
    results = client.classify([PARAPHRASE, UNRELATED], model="minilm-paraphrase")
    assert [r.label for r in results] == ["paraphrase", "different"]
    for pair, result in zip([PARAPHRASE, UNRELATED], results):
        np.testing.assert_allclose(result.logits, paraphrase_logits(*pair), atol=1e-3)


def test_raw_stubs_infer_health_and_reflection(gateway):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        listed = stub.ListModels(pb.ListModelsRequest(), timeout=30)
        assert sorted(m.name for m in listed.models) == ["minilm-embed", "minilm-paraphrase"]
        meta = stub.GetModel(pb.GetModelRequest(model="minilm-embed"), timeout=30)
        assert meta.task == "embed" and meta.tp_degree == 2 and len(meta.buckets) == 3 and meta.ready

        ids, mask, types = minilm_tokens(["raw tensors in and out"])
        reply = stub.Infer(pb.InferRequest(model="minilm-embed", inputs=[to_tensor("ids", ids.numpy()),
                                                                         to_tensor("mask", mask.numpy()),
                                                                         to_tensor("types", types.numpy())]), timeout=60)
        out = np.frombuffer(reply.outputs[0].data, dtype="<f4").reshape(list(reply.outputs[0].shape))
        np.testing.assert_allclose(out[:1], minilm_embeddings(["raw tensors in and out"]), atol=1e-4)

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
        (lambda: client.embed(["x"], model="minilm-embed", timeout=0.0001), errors.DeadlineExceeded, "(?i)deadline"),
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
    np.testing.assert_allclose(client.embed(["still correct"], model="minilm-embed"), minilm_embeddings(["still correct"]),
                               atol=1e-4)


def test_concurrent_requests_equal_one_batched_request(gateway, client):
    before = _batched_rows(gateway)
    texts = [f"sentence number {i} about tensor parallel serving" for i in range(12)]
    with futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda t: client.embed([t], model="minilm-embed")[0], texts))
    together = client.embed(texts[:4], model="minilm-embed")
    np.testing.assert_allclose(np.stack(results[:4]), together, atol=1e-4)
    # every row went through a forward exactly once (how many forwards depends on arrival times;
    # the merging itself is pinned in tests/unit/test_batching.py)
    assert _batched_rows(gateway)[1] - before[1] == 16


def test_concurrent_infer_requests_are_split_back_by_rows(gateway, client):
    """Raw-tensor requests of one shape are merged along the batch dimension and split back."""
    texts = [f"raw tensors for request {i}" for i in range(8)]
    encoded = [minilm_tokens([t]) for t in texts]
    length = max(e[0].shape[1] for e in encoded)
    inputs = [[torch.nn.functional.pad(x, (0, length - x.shape[1])).numpy() for x in e] for e in encoded]
    alone = [client.infer("minilm-embed", tensors)[0] for tensors in inputs]
    before = _batched_rows(gateway)
    with futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda tensors: client.infer("minilm-embed", tensors)[0], inputs))
    for a, b in zip(alone, together):
        assert a.shape == b.shape == (1, 384)
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert _batched_rows(gateway)[1] - before[1] == 8
    # a lone request gets its own rows back, not the padded batch bucket's
    two = [np.concatenate(parts) for parts in zip(inputs[0], inputs[1])]  # a lone request of 2 rows (bucket: 4)
    out = client.infer("minilm-embed", two)[0]
    assert out.shape == (2, 384)
    np.testing.assert_allclose(out, np.concatenate(alone[:2]), atol=1e-4)


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
    metrics_port = free_port()
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


def test_metadata_describes_inputs_outputs_limits_and_infer_matches_by_name(gateway, client):
    """A client built from the proto alone: names, outputs, RPCs and limits from GetModel; inputs by name in any order."""
    meta = client.get_model("minilm-embed")
    assert [(i.name, i.dtype, list(i.shape)) for i in meta.inputs] == [
        ("input_ids", "int64", [-1, 32]), ("attention_mask", "int64", [-1, 32]), ("token_type_ids", "int64", [-1, 32])]
    assert [(o.name, o.dtype, list(o.shape)) for o in meta.outputs] == [("embedding", "float32", [-1, 384])]
    assert list(meta.rpcs) == ["Embed", "Infer", "Tokenize"] and meta.buckets[0].inputs[0].name == "input_ids"
    assert (meta.limits.max_texts, meta.limits.max_text_characters, meta.limits.max_batch_rows) == (1024, 100_000, 16)
    assert meta.limits.max_tensor_elements == 1 << 26 and meta.limits.max_new_tokens == 0  # no generation here
    pair = client.get_model("minilm-paraphrase")
    assert [i.name for i in pair.inputs][3:] == ["input_ids_b", "attention_mask_b", "token_type_ids_b"]
    assert [(o.name, list(o.shape)) for o in pair.outputs] == [("logits", [-1, 2])]

    text = "matched by name"
    ids = client.tokenize([text], model="minilm-embed")
    expected_ids, mask, types = (t.numpy() for t in minilm_tokens([text]))
    assert ids == expected_ids.tolist()
    assert client.detokenize(ids, model="minilm-embed", skip_special_tokens=True) == [text]
    assert client.detokenize(ids, model="minilm-embed")[0].startswith("[CLS]")
    shuffled = {"token_type_ids": types, "attention_mask": mask, "input_ids": expected_ids}
    (by_name,) = client.infer("minilm-embed", shuffled)
    np.testing.assert_allclose(by_name, minilm_embeddings([text]), atol=1e-4)
    with grpc.insecure_channel(gateway.target) as channel:
        reply = pb_grpc.InferenceStub(channel).Infer(pb.InferRequest(model="minilm-embed", inputs=[
            to_tensor(n, a) for n, a in shuffled.items()]), timeout=60)
        assert [o.name for o in reply.outputs] == ["embedding"]
    bad = [
        (lambda: client.infer("minilm-embed", {"input_ids": expected_ids, "mask": mask, "token_type_ids": types}),
         r"inputs \['mask'\] are not among its inputs"),
        (lambda: client.infer("minilm-embed", {"input_ids": expected_ids, "attention_mask": mask}), r"missing inputs \['token_type_ids'\]"),
        (lambda: client.detokenize([[10 ** 9]], model="minilm-embed"), "outside the vocabulary"),
        (lambda: client.tokenize([""], model="minilm-embed"), "empty"),
    ]
    for call, message in bad:
        with pytest.raises(errors.InvalidArgument, match=message):
            call()


def test_reflection_v1_is_served_beside_v1alpha(gateway):
    from grpc_reflection.v1alpha import reflection_pb2

    with grpc.insecure_channel(gateway.target) as channel:
        info = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                     request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="tpcluster.v1.Inference")]
        listed, described = list(info(iter(requests), timeout=10))
    services = {s.name for s in listed.list_services_response.service}
    assert {"tpcluster.v1.Inference", "inference.GRPCInferenceService", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= services
    from google.protobuf import descriptor_pb2

    files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in described.file_descriptor_response.file_descriptor_proto]
    methods = {m.name for f in files for s in f.service for m in s.method}
    assert {"Tokenize", "Infer", "Generate"} <= methods
