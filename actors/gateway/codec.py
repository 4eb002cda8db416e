"""The only place protobuf messages meet Python values: decode requests, encode responses.

Every check on what a client sent happens here and raises InputError (INVALID_ARGUMENT) or
Overloaded (RESOURCE_EXHAUSTED) with a message the client can act on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from clients.protocol import inference_pb2 as pb
from cluster.errors import InputError, Overloaded

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "float64": np.dtype("<f8"),
    "int64": np.dtype("<i8"), "int32": np.dtype("<i4"), "int16": np.dtype("<i2"), "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"), "bool": np.dtype("?"),
}
MAX_TENSOR_ELEMENTS = 1 << 26  # 64 Mi elements: larger payloads are refused, not buffered
MAX_TEXTS = 1024
MAX_TEXT_CHARS = 100_000
MAX_NEW_TOKENS = 4096


def decode_tensor(message: pb.Tensor, index: int) -> tuple[str, np.ndarray]:
    label = f"input {index}" + (f" ({message.name!r})" if message.name else "")
    dtype = DTYPES.get(message.dtype)
    if dtype is None:
        raise InputError(f"{label}: unknown dtype {message.dtype!r}; use one of {sorted(DTYPES)}")
    shape = list(message.shape)
    if any(d < 0 for d in shape):
        raise InputError(f"{label}: negative dimension in shape {shape}")
    count = 1
    for d in shape:
        count *= d
        if count > MAX_TENSOR_ELEMENTS:
            raise Overloaded(f"{label}: shape {shape} has more than {MAX_TENSOR_ELEMENTS} elements; send smaller tensors")
    expected = count * dtype.itemsize
    if len(message.data) != expected:
        raise InputError(
            f"{label}: shape {shape} of {message.dtype} needs {expected} bytes, got {len(message.data)}; "
            "data must be the C-order little-endian bytes of the tensor"
        )
    array = np.frombuffer(message.data, dtype=dtype).reshape(shape)
    return message.name, array.astype(dtype.newbyteorder("="), copy=True)


def encode_tensor(name: str, array: np.ndarray) -> pb.Tensor:
    dtype_name = next((k for k, v in DTYPES.items() if v == array.dtype.newbyteorder("<") or v == array.dtype), None)
    if dtype_name is None:
        raise InputError(f"output {name!r} has dtype {array.dtype}, which the protocol cannot carry")
    data = np.ascontiguousarray(array.astype(DTYPES[dtype_name], copy=False)).tobytes()
    return pb.Tensor(name=name, dtype=dtype_name, shape=list(array.shape), data=data)


def decode_texts(texts: Any, what: str = "texts") -> list[str]:
    texts = list(texts)
    if not texts:
        raise InputError(f"{what}: empty; send at least one text")
    if len(texts) > MAX_TEXTS:
        raise Overloaded(f"{what}: {len(texts)} texts in one request; send at most {MAX_TEXTS}")
    for i, text in enumerate(texts):
        if not text.strip():
            raise InputError(f"{what}[{i}] is empty; send non-empty text")
        if len(text) > MAX_TEXT_CHARS:
            raise InputError(f"{what}[{i}] has {len(text)} characters; at most {MAX_TEXT_CHARS}")
    return texts


def decode_pairs(inputs: Any) -> list[tuple[str, str | None]]:
    inputs = list(inputs)
    firsts = decode_texts([i.text for i in inputs], "inputs.text")
    return [(a, i.text_pair or None) for a, i in zip(firsts, inputs)]


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    draft_model: str
    speculation_length: int


def decode_generate(request: pb.GenerateRequest) -> tuple[str, Sampling]:
    prompt = request.prompt
    if not prompt.strip():
        raise InputError("prompt is empty; send the text to continue")
    if len(prompt) > MAX_TEXT_CHARS:
        raise InputError(f"prompt has {len(prompt)} characters; at most {MAX_TEXT_CHARS}")
    s = request.sampling
    max_new = request.max_new_tokens or 64
    if max_new > MAX_NEW_TOKENS:
        raise InputError(f"max_new_tokens {max_new} is above {MAX_NEW_TOKENS}")
    if not (0.0 <= s.temperature <= 100.0) or s.temperature != s.temperature:
        raise InputError(f"temperature {s.temperature} is out of range; use 0 (greedy) to 100")
    if not (0.0 <= s.top_p <= 1.0) or s.top_p != s.top_p:
        raise InputError(f"top_p {s.top_p} is out of range; use a value in (0, 1], or 0 for no top-p")
    if s.top_k > 1_000_000:
        raise InputError(f"top_k {s.top_k} is out of range")
    if request.speculation_length > 16:
        raise InputError(f"speculation_length {request.speculation_length} is above 16")
    if any(not stop for stop in request.stop) or len(request.stop) > 16:
        raise InputError("stop sequences must be non-empty strings, at most 16 of them")
    return prompt, Sampling(
        max_new_tokens=max_new, temperature=float(s.temperature), top_k=int(s.top_k),
        top_p=float(s.top_p) if s.top_p else 1.0, seed=int(s.seed) if s.HasField("seed") else None,
        stop=tuple(request.stop), draft_model=request.draft_model,
        speculation_length=int(request.speculation_length or 4),
    )
