"""The committed stubs match proto/, and the codec refuses malformed payloads with a message."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.gateway import codec
from clients.client import from_tensor, to_tensor
from clients.protocol import generate, tensors
from clients.protocol import inference_pb2 as pb
from cluster.errors import InputError, Overloaded
from cluster.generation.defaults import DEFAULTS


def test_committed_stubs_match_the_proto():
    assert generate.main(["--check"]) == 0, "stubs are stale: run python -m clients.protocol.generate"


def test_the_stub_check_ignores_the_generators_version_but_not_the_code():
    """A grpcio-tools patch release rewrites only the version banners: not stale. A changed line is."""
    stub = (generate.HERE / "inference_pb2_grpc.py").read_text()
    bumped = stub.replace("GRPC_GENERATED_VERSION = '", "GRPC_GENERATED_VERSION = '9.")
    assert bumped != stub and generate.without_versions(bumped) == generate.without_versions(stub)
    message = (generate.HERE / "inference_pb2.py").read_text()
    runtime = message.replace("_runtime_version.Domain.PUBLIC,\n    7,", "_runtime_version.Domain.PUBLIC,\n    8,")
    assert runtime != message and generate.without_versions(runtime) == generate.without_versions(message)
    changed = stub.replace("class InferenceStub", "class InferenceStub2")
    assert generate.without_versions(changed) != generate.without_versions(stub)


def test_no_importable_package_named_proto():
    import importlib.util
    import pathlib

    root = pathlib.Path(generate.__file__).resolve().parents[2]
    assert not (root / "proto" / "__init__.py").exists()
    spec = importlib.util.find_spec("proto")  # proto-plus (a dependency of ray[default]) is one; ours must not be
    assert spec is None or (root / "proto") not in [pathlib.Path(p).resolve() for p in spec.submodule_search_locations or []]


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"])
def test_tensor_round_trip(dtype):
    array = (np.arange(24).reshape(2, 3, 4) % 2).astype(dtype)
    name, decoded = codec.decode_tensor(to_tensor("x", array), 0)
    assert name == "x" and decoded.dtype == array.dtype and np.array_equal(decoded, array)
    assert np.array_equal(from_tensor(codec.encode_tensor("y", array)), array)


@settings(max_examples=300, deadline=None)
@given(dtype=st.text(max_size=12), shape=st.lists(st.integers(-3, 1 << 40), max_size=6), data=st.binary(max_size=256))
def test_decode_tensor_never_crashes(dtype, shape, data):
    """Any payload decodes to a tensor of exactly the declared size, or is refused with a message."""
    message = pb.Tensor(name="fuzz", dtype=dtype, shape=shape, data=data)
    try:
        _, array = codec.decode_tensor(message, 0)
    except (InputError, Overloaded) as exc:
        assert str(exc).startswith("input 0")
    else:
        assert list(array.shape) == shape and array.nbytes == len(data) and array.dtype == tensors.DTYPES[dtype]


@settings(max_examples=200, deadline=None)
@given(prompt=st.text(max_size=50), max_new=st.integers(0, 10_000), temperature=st.floats(allow_nan=True, width=32),
       top_p=st.floats(allow_nan=True, width=32), top_k=st.integers(0, 1 << 31), k=st.integers(0, 100),
       stop=st.lists(st.text(max_size=5), max_size=20))
def test_decode_generate_never_crashes(prompt, max_new, temperature, top_p, top_k, k, stop):
    request = pb.GenerateRequest(prompt=prompt, max_new_tokens=max_new, speculation_length=k, stop=stop,
                                 sampling=pb.SamplingParameters(temperature=temperature, top_p=top_p, top_k=top_k))
    try:
        text, sampling = codec.decode_generate(request)
    except InputError as exc:
        assert str(exc)
    else:
        assert text.strip() and 1 <= sampling.max_new_tokens <= DEFAULTS.max_new_tokens_limit
        assert 0 <= sampling.temperature <= 100 and 0 < sampling.top_p <= 1 and not math.isnan(sampling.top_p)
        assert 0 <= sampling.speculation_length <= 16  # 0: adaptive


def test_text_limits():
    with pytest.raises(InputError, match="empty; send at least one text"):
        codec.decode_texts([])
    with pytest.raises(InputError, match=r"texts\[1\] is empty"):
        codec.decode_texts(["a", "  "])
    with pytest.raises(Overloaded, match="at most 1024"):
        codec.decode_texts(["a"] * 2000)


def test_invalid_utf8_never_reaches_a_model():
    raw = pb.EmbedRequest(model="m", texts=["ok"]).SerializeToString().replace(b"ok", b"\xff\xfe")
    with pytest.raises(Exception) as info:
        pb.EmbedRequest.FromString(raw)
    assert "utf-8" in str(info.value).lower() or "parse" in str(info.value).lower()


# tpcluster.v1 as released before issue 16: every field and RPC keeps its number and types (additions only).
V1_FIELDS = {
    "Tensor": {"name": 1, "dtype": 2, "shape": 3, "data": 4}, "TensorSpec": {"name": 1, "dtype": 2, "shape": 3},
    "Bucket": {"inputs": 1},
    "ModelMetadata": {"name": 1, "task": 2, "tp_degree": 3, "backend": 4, "buckets": 5, "inputs": 6, "ready": 7,
                      "replicas": 8, "ready_replicas": 9, "labels": 10, "max_sequence_length": 11},
    "ListModelsResponse": {"models": 1}, "GetModelRequest": {"model": 1},
    "RankStatus": {"rank": 1, "node": 2, "neuron_cores": 3, "pid": 4, "memory_bytes": 5},
    "ReplicaStatus": {"index": 1, "ready": 2, "ranks": 3, "error": 4, "in_flight": 5, "coordinator_pid": 6, "recoveries": 7},
    "ModelStatus": {"name": 1, "task": 2, "tp_degree": 3, "queue_depth": 4, "replicas": 5},
    "StatusResponse": {"models": 1, "gateway_version": 2}, "EmbedRequest": {"model": 1, "texts": 2},
    "Embedding": {"values": 1}, "EmbedResponse": {"embeddings": 1, "dimensions": 2},
    "TextInput": {"text": 1, "text_pair": 2}, "ClassifyRequest": {"model": 1, "inputs": 2},
    "Classification": {"logits": 1, "label_id": 2, "label": 3}, "ClassifyResponse": {"results": 1},
    "InferRequest": {"model": 1, "inputs": 2}, "InferResponse": {"outputs": 1},
    "SamplingParameters": {"temperature": 1, "top_k": 2, "top_p": 3, "seed": 4},
    "GenerateRequest": {"model": 1, "prompt": 2, "max_new_tokens": 3, "sampling": 4, "stop": 5, "draft_model": 6,
                        "speculation_length": 7},
    "GenerateStats": {"prompt_tokens": 1, "generated_tokens": 2, "finish_reason": 3, "draft_tokens_proposed": 4,
                      "draft_tokens_accepted": 5, "acceptance_rate": 6, "mean_accepted_length": 7,
                      "time_to_first_token_ms": 8, "total_ms": 9, "tokens_per_second": 10},
    "GeneratedToken": {"id": 1, "text": 2}, "GenerateResponse": {"token": 1, "stats": 2},
}
V1_RPCS = {"ListModels": ("ListModelsRequest", "ListModelsResponse", False), "GetModel": ("GetModelRequest", "ModelMetadata", False),
           "GetStatus": ("GetStatusRequest", "StatusResponse", False), "Embed": ("EmbedRequest", "EmbedResponse", False),
           "Classify": ("ClassifyRequest", "ClassifyResponse", False), "Infer": ("InferRequest", "InferResponse", False),
           "Generate": ("GenerateRequest", "GenerateResponse", True)}


def test_tpcluster_v1_only_grows():
    """Old clients keep working: no field or RPC of the released protocol was renumbered, retyped or removed."""
    for message, fields in V1_FIELDS.items():
        descriptor = pb.DESCRIPTOR.message_types_by_name[message]
        assert {name: descriptor.fields_by_name[name].number for name in fields} == fields, message
    service = pb.DESCRIPTOR.services_by_name["Inference"]
    for name, (request, response, streaming) in V1_RPCS.items():
        method = service.methods_by_name[name]
        assert (method.input_type.name, method.output_type.name, method.server_streaming) == (request, response, streaming)
    # a message an old server sent still parses, and an old client ignores the new fields
    old = pb.ModelMetadata(name="m", task="embed", max_sequence_length=32).SerializeToString()
    assert pb.ModelMetadata.FromString(old).max_sequence_length == 32


def test_tokenize_requests_are_checked():
    assert codec.decode_tokenize(pb.TokenizeRequest(texts=["a b"])) == (["a b"], None)
    assert codec.decode_tokenize(pb.TokenizeRequest(token_ids=[pb.TokenIds(ids=[1, 2])])) == (None, [[1, 2]])
    with pytest.raises(InputError, match="not both"):
        codec.decode_tokenize(pb.TokenizeRequest(texts=["a"], token_ids=[pb.TokenIds(ids=[1])]))
    with pytest.raises(InputError, match="nothing to tokenize"):
        codec.decode_tokenize(pb.TokenizeRequest())
    with pytest.raises(Overloaded, match="at most 1024"):
        codec.decode_tokenize(pb.TokenizeRequest(token_ids=[pb.TokenIds(ids=[1])] * 1025))
