"""Open Inference Protocol messages in and out (actors.gateway.oip_codec) and Infer's names (actors.gateway.signatures)."""

import struct

import numpy as np
import pytest

from actors.gateway import oip_codec
from actors.gateway.signatures import (
    input_names,
    input_specs,
    merge_output_specs,
    order_inputs,
)
from clients.protocol import grpc_predict_v2_pb2 as oip
from cluster.errors import InputError, Overloaded
from cluster.serving import ServingSpec


def _request(*inputs, raw=None, **kwargs):
    request = oip.ModelInferRequest(model_name="m", **kwargs)
    for name, datatype, shape, contents in inputs:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        for field, values in (contents or {}).items():
            getattr(tensor.contents, field).extend(values)
    request.raw_input_contents.extend(raw or [])
    return request


def _bytes_tensor(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def test_raw_and_contents_give_the_same_arrays():
    ids = np.array([[101, 2023, 102]], dtype=np.int64)
    raw = oip_codec.decode_inputs(_request(("input_ids", "INT64", [1, 3], None), raw=[ids.tobytes()]))
    typed = oip_codec.decode_inputs(_request(("input_ids", "INT64", [1, 3], {"int64_contents": ids.ravel().tolist()})))
    for decoded in (raw, typed):
        assert decoded[0][0] == "input_ids" and decoded[0][1].dtype == np.int64
        np.testing.assert_array_equal(decoded[0][1], ids)
    half = np.array([1.5, -2.0], dtype=np.float16)
    (_, got), = oip_codec.decode_inputs(_request(("x", "FP16", [2], None), raw=[half.tobytes()]))
    assert got.dtype == np.float16 and got.tolist() == [1.5, -2.0]
    (_, small), = oip_codec.decode_inputs(_request(("x", "INT8", [2], {"int_contents": [-3, 7]})))
    assert small.dtype == np.int8 and small.tolist() == [-3, 7]


def test_bytes_tensors_are_text():
    (_, raw), = oip_codec.decode_inputs(_request(("text", "BYTES", [2], None), raw=[_bytes_tensor(b"hello", "é".encode())]))
    (_, typed), = oip_codec.decode_inputs(_request(("text", "BYTES", [2], {"bytes_contents": [b"hello", "é".encode()]})))
    assert raw.tolist() == typed.tolist() == ["hello", "é"]
    assert oip_codec.texts_of(raw, "text") == ["hello", "é"]


@pytest.mark.parametrize("request_, message", [
    (lambda: _request(("x", "INT64", [1, 4], None), raw=[b"\0" * 8]), "needs 32 bytes of INT64, got 8"),
    (lambda: _request(("x", "FP32", [3], {"fp32_contents": [1.0]})), "needs 3 values"),
    (lambda: _request(("x", "BF16", [1], None), raw=[b"\0\0"]), "datatype 'BF16' is not carried"),
    (lambda: _request(("x", "FP16", [1], {})), "no contents field; send it in raw_input_contents"),
    (lambda: _request(("x", "INT8", [1], {"int_contents": [300]})), "outside the range of INT8"),
    (lambda: _request(("x", "INT64", [1], None), ("y", "INT64", [1], None), raw=[b"\0" * 8]), "2 inputs"),
    (lambda: _request(("text", "BYTES", [1], None), raw=[b"\x09\0\0\0abc"]), "past the end"),
    (lambda: _request(("text", "BYTES", [1], None), raw=[_bytes_tensor(b"\xff\xfe")]), "not UTF-8"),
    (lambda: _request(("x", "INT64", [-1], None), raw=[b""]), "negative dimension"),
    (lambda: oip.ModelInferRequest(model_name="m"), "no input tensors"),
])
def test_malformed_tensors_are_refused_with_what_to_send(request_, message):
    with pytest.raises(InputError, match=message):
        oip_codec.decode_inputs(request_())


def test_oversized_tensors_are_refused_before_reading():
    with pytest.raises(Overloaded, match="elements"):
        oip_codec.decode_inputs(_request(("x", "FP32", [1 << 20, 1 << 10], None), raw=[b""]))


def test_response_carries_raw_outputs_and_honours_requested_outputs():
    request = _request(("text", "BYTES", [1], None), id="req-7")
    request.outputs.add(name="label")
    outputs = [("logits", np.array([[0.5, -1.0]], np.float32)), ("label", np.array(["paraphrase"], dtype=object))]
    response = oip_codec.infer_response(request, outputs, {"finish_reason": "eos", "generated_tokens": 3})
    assert response.id == "req-7" and response.model_version == "1"
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("label", "BYTES", [1])]
    assert response.raw_output_contents[0] == _bytes_tensor(b"paraphrase")
    assert response.parameters["finish_reason"].string_param == "eos"
    assert response.parameters["generated_tokens"].int64_param == 3
    everything = oip_codec.infer_response(_request(("text", "BYTES", [1], None)), outputs)
    assert np.frombuffer(everything.raw_output_contents[0], "<f4").tolist() == [0.5, -1.0]
    request.outputs.add(name="nope")
    with pytest.raises(InputError, match=r"no outputs \['nope'\]"):
        oip_codec.infer_response(request, outputs)


def test_generation_parameters_go_through_generates_checks():
    text = np.array(["The for statement"], dtype=object)
    params = {"max_tokens": oip.InferParameter(int64_param=5), "temperature": oip.InferParameter(double_param=0.0),
              "stop": oip.InferParameter(string_param="\n")}
    prompt, sampling = oip_codec.generate_request("pair-target", {"text_input": text}, params)
    assert prompt == "The for statement" and sampling.max_new_tokens == 5 and sampling.stop == ("\n",)
    with pytest.raises(InputError, match="above 4096"):
        oip_codec.generate_request("m", {"text_input": text}, {"max_tokens": oip.InferParameter(int64_param=5000)})
    with pytest.raises(InputError, match=r"unknown parameters \['beam'\]"):
        oip_codec.generate_request("m", {"text_input": text}, {"beam": oip.InferParameter(int64_param=2)})
    with pytest.raises(InputError, match="generation parameters"):
        oip_codec.generate_request("m", {"text_input": text}, {"top_k": oip.InferParameter(int64_param=-1)})
    with pytest.raises(InputError, match="one prompt per request"):
        oip_codec.generate_request("m", {"text_input": np.array(["a", "b"], dtype=object)}, {})
    with pytest.raises(InputError, match="'text_input'"):
        oip_codec.generate_request("m", {"prompt": text}, {})


def test_input_names_by_task_and_declared():
    assert input_names(ServingSpec(task="embed"), 3) == ["input_ids", "attention_mask", "token_type_ids"]
    pair = ServingSpec(task="classify", pair_encoding="separate")
    assert input_names(pair, 6)[:4] == ["input_ids_a", "attention_mask_a", "token_type_ids_a", "input_ids_b"]
    assert input_names(ServingSpec(task="infer"), 2) == ["input_0", "input_1"]
    assert input_names(ServingSpec(task="infer", extra={"input_names": ["pixels", "mask"]}), 2) == ["pixels", "mask"]
    assert input_names(ServingSpec(task="infer", extra={"input_names": ["a", "a"]}), 2) == ["input_0", "input_1"]
    buckets = [[{"shape": [1, 32], "dtype": "int64"}] * 3, [{"shape": [4, 32], "dtype": "int64"}] * 3]
    specs = input_specs(ServingSpec(task="embed"), buckets)
    assert (specs[0].name, specs[0].dtype, specs[0].shape) == ("input_ids", "int64", (-1, 32))


def test_output_specs_follow_the_rows():
    probes = [(1, [np.zeros((1, 384), np.float32)]), (16, [np.zeros((16, 384), np.float32)])]
    (spec,) = merge_output_specs(ServingSpec(task="embed"), probes)
    assert (spec.name, spec.dtype, spec.shape) == ("embedding", "float32", (-1, 384))


def test_inputs_match_by_name_or_position():
    expected = ["input_ids", "attention_mask", "token_type_ids"]
    assert order_inputs("m", expected, [("token_type_ids", 3), ("input_ids", 1), ("attention_mask", 2)]) == [1, 2, 3]
    assert order_inputs("m", expected, [("ids", 1), ("mask", 2), ("types", 3)]) == [1, 2, 3]  # old clients
    assert order_inputs("m", expected, [("", 1), ("", 2), ("", 3)]) == [1, 2, 3]
    with pytest.raises(InputError, match=r"inputs \['input_idz'\] are not among its inputs"):
        order_inputs("m", expected, [("input_idz", 1), ("attention_mask", 2), ("token_type_ids", 3)])
    with pytest.raises(InputError, match=r"missing inputs \['token_type_ids'\]"):
        order_inputs("m", expected, [("input_ids", 1), ("attention_mask", 2)])
    with pytest.raises(InputError, match="more than once"):
        order_inputs("m", expected, [("input_ids", 1), ("input_ids", 2), ("token_type_ids", 3)])
