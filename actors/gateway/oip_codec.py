"""The Open Inference Protocol's messages (KServe v2, `inference.*`) in and out, as actors.gateway.codec
is for tpcluster.v1: the OIP servicer (actors.gateway.oip) only calls these.

Tensors arrive in `contents` (the repeated field of their datatype) or in `raw_input_contents`
(little-endian bytes in row-major order; BYTES elements each a 4-byte little-endian length, then
the bytes), and leave in `raw_output_contents`, as Triton's server sends them. Every check raises
InputError (INVALID_ARGUMENT) or Overloaded (RESOURCE_EXHAUSTED) with a message the client can act on.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from actors.gateway.codec import MAX_TENSOR_ELEMENTS, MAX_TEXT_CHARS, decode_generate
from clients.protocol import grpc_predict_v2_pb2 as oip
from clients.protocol import inference_pb2 as pb
from cluster.errors import InputError, Overloaded

VERSION = "1"  # every model has one version
# the OIP datatype <-> the numpy dtype tpcluster.v1 carries (clients.protocol.tensors.DTYPES), plus BYTES
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"), "BYTES": np.dtype(object),
}
_CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
             "BYTES": "bytes_contents"}
_WIRE_TO_OIP = {"bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
                "float16": "FP16", "float32": "FP32", "float64": "FP64"}


def datatype_of(dtype: str) -> str:
    """The OIP datatype of a tpcluster.v1 dtype name (float32 -> FP32)."""
    return _WIRE_TO_OIP.get(dtype, dtype.upper())


# -- requests ----------------------------------------------------------------------------------
def decode_inputs(request: oip.ModelInferRequest) -> list[tuple[str, np.ndarray]]:
    """(name, array) per input tensor; BYTES tensors are numpy object arrays of str."""
    if not request.inputs:
        raise InputError("no input tensors; send the inputs ModelMetadata lists")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InputError(f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs; "
                         "send one per input, in the order of inputs")
    decoded = []
    for i, tensor in enumerate(request.inputs):
        label = f"input {i} ({tensor.name!r})"
        dtype = DATATYPES.get(tensor.datatype)
        if dtype is None:
            raise InputError(f"{label}: datatype {tensor.datatype!r} is not carried; use one of {sorted(DATATYPES)}")
        shape = list(tensor.shape)
        if any(d < 0 for d in shape):
            raise InputError(f"{label}: negative dimension in shape {shape}")
        count = math.prod(shape)
        if count > MAX_TENSOR_ELEMENTS:
            raise Overloaded(f"{label}: shape {shape} has more than {MAX_TENSOR_ELEMENTS} elements; send smaller tensors")
        if raw:
            if tensor.HasField("contents"):
                raise InputError(f"{label}: both contents and raw_input_contents; send the data in one of them")
            values = _from_raw(raw[i], tensor.datatype, dtype, count, label)
        else:
            values = _from_contents(tensor, dtype, count, label)
        decoded.append((tensor.name, values.reshape(shape)))
    return decoded


def _from_raw(data: bytes, datatype: str, dtype: np.dtype, count: int, label: str) -> np.ndarray:
    if datatype == "BYTES":
        items, at = [], 0
        while at < len(data):
            if at + 4 > len(data):
                raise InputError(f"{label}: BYTES data ends inside a length prefix")
            (size,) = struct.unpack_from("<I", data, at)
            if at + 4 + size > len(data):
                raise InputError(f"{label}: BYTES element {len(items)} claims {size} bytes past the end of the data")
            items.append(data[at + 4: at + 4 + size])
            at += 4 + size
        if len(items) != count:
            raise InputError(f"{label}: shape needs {count} BYTES elements, raw data holds {len(items)}")
        return _texts(items, label)
    if len(data) != count * dtype.itemsize:
        raise InputError(f"{label}: shape needs {count * dtype.itemsize} bytes of {datatype}, got {len(data)}; "
                         "raw data is the row-major little-endian bytes of the tensor")
    return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="), copy=True)


def _from_contents(tensor: Any, dtype: np.dtype, count: int, label: str) -> np.ndarray:
    field = _CONTENTS.get(tensor.datatype)
    if field is None:
        raise InputError(f"{label}: {tensor.datatype} has no contents field; send it in raw_input_contents")
    values = list(getattr(tensor.contents, field))
    if len(values) != count:
        raise InputError(f"{label}: shape needs {count} values, contents.{field} holds {len(values)}")
    if tensor.datatype == "BYTES":
        return _texts(values, label)
    array = np.array(values, dtype=np.float64 if dtype.kind == "f" else None)
    if dtype.kind in "iu" and array.size and (array.min() < np.iinfo(dtype).min or array.max() > np.iinfo(dtype).max):
        raise InputError(f"{label}: values outside the range of {tensor.datatype}")
    return array.astype(dtype.newbyteorder("=")).reshape(-1)


def _texts(items: Sequence[bytes], label: str) -> np.ndarray:
    texts = np.empty(len(items), dtype=object)
    for j, item in enumerate(items):
        try:
            texts[j] = item.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{label}: element {j} is not UTF-8 text") from exc
        if len(texts[j]) > MAX_TEXT_CHARS:
            raise InputError(f"{label}: element {j} has {len(texts[j])} characters; at most {MAX_TEXT_CHARS}")
    return texts


def texts_of(array: np.ndarray, name: str) -> list[str]:
    """The strings of a BYTES input (any shape, read in row-major order)."""
    if array.dtype != object:
        raise InputError(f"input {name!r} must be BYTES (UTF-8 text), got numbers")
    return [str(t) for t in array.reshape(-1)]


def generate_request(model: str, inputs: dict[str, np.ndarray], parameters: Any) -> tuple[str, Any]:
    """A text generation as tpcluster.v1's Generate takes it (same checks, same defaults): the prompt
    from the BYTES input `text_input` (one element), sampling from the request's parameters."""
    if set(inputs) != {"text_input"}:
        raise InputError(f"model {model!r} generates text: send one BYTES input named 'text_input', got {sorted(inputs)}")
    prompts = texts_of(inputs["text_input"], "text_input")
    if len(prompts) != 1:
        raise InputError(f"text_input holds {len(prompts)} prompts; send one prompt per request")
    params = {key: _param(value) for key, value in parameters.items()}
    known = {"max_tokens", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "draft_model",
             "speculation_length"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise InputError(f"unknown parameters {unknown}; generation takes {sorted(known)}")
    try:
        sampling = pb.SamplingParameters(temperature=float(params.get("temperature", 0.0)),
                                         top_k=int(params.get("top_k", 0)), top_p=float(params.get("top_p", 0.0)))
        if "seed" in params:
            sampling.seed = int(params["seed"])
        request = pb.GenerateRequest(
            model=model, prompt=prompts[0], sampling=sampling,
            max_new_tokens=int(params.get("max_new_tokens", params.get("max_tokens", 0))),
            stop=[params["stop"]] if params.get("stop") else [], draft_model=str(params.get("draft_model", "")),
            speculation_length=int(params.get("speculation_length", 0)))
    except (TypeError, ValueError) as exc:  # wrong type, or a negative number for an unsigned field
        raise InputError(f"generation parameters: {exc}") from exc
    return decode_generate(request)


def _param(value: oip.InferParameter) -> Any:
    return getattr(value, value.WhichOneof("parameter_choice")) if value.WhichOneof("parameter_choice") else None


# -- responses ---------------------------------------------------------------------------------
def infer_response(request: oip.ModelInferRequest, outputs: Sequence[tuple[str, np.ndarray]],
                   parameters: dict[str, Any] | None = None) -> oip.ModelInferResponse:
    """The response with the requested outputs (all when none is named), data in raw_output_contents."""
    wanted = [o.name for o in request.outputs]
    have = [name for name, _ in outputs]
    missing = [name for name in wanted if name not in have]
    if missing:
        raise InputError(f"model {request.model_name!r} has no outputs {missing}; it returns {have}")
    chosen = [(n, a) for n, a in outputs if not wanted or n in wanted]
    response = oip.ModelInferResponse(model_name=request.model_name, model_version=VERSION, id=request.id)
    for key, value in (parameters or {}).items():
        _set_param(response.parameters[key], value)
    for name, array in chosen:
        datatype, raw = _to_raw(name, np.asarray(array))
        response.outputs.add(name=name, datatype=datatype, shape=list(np.shape(array)))
        response.raw_output_contents.append(raw)
    return response


def _to_raw(name: str, array: np.ndarray) -> tuple[str, bytes]:
    if array.dtype == object or array.dtype.kind in "US":
        items = [s.encode() if isinstance(s, str) else bytes(s) for s in array.reshape(-1)]
        return "BYTES", b"".join(struct.pack("<I", len(b)) + b for b in items)
    datatype = _WIRE_TO_OIP.get(array.dtype.name)
    if datatype is None:
        raise InputError(f"output {name!r} has dtype {array.dtype}, which the protocol cannot carry")
    return datatype, np.ascontiguousarray(array.astype(DATATYPES[datatype], copy=False)).tobytes()


def _set_param(target: oip.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = str(value)


def model_metadata(model: Any) -> oip.ModelMetadataResponse:
    """A served model (actors.gateway.served.ServedModel) as the OIP describes it: text in and out for
    the text tasks (embed and classify also take Infer's raw tensors: see ModelMetadata of tpcluster.v1)."""
    meta = oip.ModelMetadataResponse(name=model.name, versions=[VERSION], platform=f"tpcluster_{model.spec.task}")
    spec = oip.ModelMetadataResponse.TensorMetadata
    out = {o.name: o for o in model.outputs}
    if model.spec.task == "generate":
        meta.inputs.append(spec(name="text_input", datatype="BYTES", shape=[1]))
        meta.outputs.append(spec(name="text_output", datatype="BYTES", shape=[1]))
    elif model.spec.task in ("embed", "classify"):
        meta.inputs.append(spec(name="text", datatype="BYTES", shape=[-1]))
        if model.spec.task == "classify":
            meta.inputs.append(spec(name="text_pair", datatype="BYTES", shape=[-1]))
        name = "embedding" if model.spec.task == "embed" else "logits"
        width = out[name].shape[-1] if name in out else (len(model.spec.labels) or -1)
        meta.outputs.append(spec(name=name, datatype="FP32", shape=[-1, width]))
        if model.spec.task == "classify":
            meta.outputs.extend([spec(name="label_id", datatype="INT64", shape=[-1]),
                                 spec(name="label", datatype="BYTES", shape=[-1])])
    else:
        meta.inputs.extend(spec(name=t.name, datatype=datatype_of(t.dtype), shape=list(t.shape)) for t in model.inputs)
        meta.outputs.extend(spec(name=t.name, datatype=datatype_of(t.dtype), shape=list(t.shape)) for t in model.outputs)
    return meta
