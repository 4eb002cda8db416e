"""The committed stubs match proto/, and the codec refuses malformed payloads with a message."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.gateway import codec
from clients.client import from_tensor, to_tensor
from clients.protocol import generate
from clients.protocol import inference_pb2 as pb
from clients.protocol import tensors
from cluster.errors import InputError, Overloaded
from cluster.generation.defaults import DEFAULTS


def test_committed_stubs_match_the_proto():
    assert generate.main(["--check"]) == 0, "stubs are stale: run python -m clients.protocol.generate"


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
        assert 1 <= sampling.speculation_length <= 16


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
