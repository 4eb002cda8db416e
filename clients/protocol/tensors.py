"""The wire form of a tensor, written once for the client and the gateway.

A `Tensor` message carries a dtype name from `DTYPES`, a shape, and the C-order little-endian
bytes of the values. Depends only on numpy and the generated `inference_pb2`.
"""

from __future__ import annotations

import math

import numpy as np

from clients.protocol import inference_pb2 as pb

__all__ = ["DTYPES", "from_tensor", "to_tensor"]

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "float64": np.dtype("<f8"),
    "int64": np.dtype("<i8"), "int32": np.dtype("<i4"), "int16": np.dtype("<i2"), "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"), "bool": np.dtype("?"),
}
"""Wire dtype name -> the numpy dtype of its bytes on the wire (little-endian)."""


def to_tensor(name: str, array: np.ndarray) -> pb.Tensor:
    """The `Tensor` message of `array`, in any byte order; TypeError for a dtype not in DTYPES."""
    array = np.asarray(array)
    little = array.dtype.newbyteorder("<")
    dtype = next((wire for wire, dt in DTYPES.items() if dt == little), None)
    if dtype is None:
        raise TypeError(f"dtype {array.dtype} cannot be sent; use one of {sorted(DTYPES)}")
    data = np.ascontiguousarray(array.astype(DTYPES[dtype], copy=False)).tobytes()
    return pb.Tensor(name=name, dtype=dtype, shape=list(array.shape), data=data)


def from_tensor(message: pb.Tensor) -> np.ndarray:
    """A new native-byte-order array of `message`; ValueError (saying what to send instead) when
    the dtype is unknown, a dimension is negative, or the bytes do not fill the shape exactly."""
    dtype = DTYPES.get(message.dtype)
    if dtype is None:
        raise ValueError(f"unknown dtype {message.dtype!r}; use one of {sorted(DTYPES)}")
    shape = list(message.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    expected = math.prod(shape) * dtype.itemsize
    if len(message.data) != expected:
        raise ValueError(f"shape {shape} of {message.dtype} needs {expected} bytes, got {len(message.data)}; "
                         "data must be the C-order little-endian bytes of the tensor")
    return np.frombuffer(message.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=True)
