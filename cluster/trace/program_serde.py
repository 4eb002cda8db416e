"""Reading a serialized torch.export program quickly: the cpu backend's graph loader.

torch's own `torch._export.serde.serialize.deserialize` turns the program's JSON into schema
dataclasses with a `typing.get_type_hints` call for every node, argument and tensor it meets
(~36,000 calls for one decoder bucket graph): measured 78% of a graph's load here, ~1.4 s of
~1.8 s per bucket on these machines, and a replica loads every bucket on every rank when it is
rebuilt. `deserialize_program` does the same conversion with the hints looked up once per schema
class, then hands the dataclasses to torch's own `ExportedProgramDeserializer`, unchanged. The
result is the same program (checked by tests/unit/test_program_serde.py against torch's path).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from typing import Annotated, Any, Callable

import torch
from torch._export.serde import schema
from torch._export.serde.serialize import ExportedProgramDeserializer, _resolve_schema_cls
from torch._export.serde.union import _Union, _UnionTag


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, globalns=vars(schema))


@functools.cache
def _converter(hint: Any) -> Callable[[Any], Any]:
    """The function that turns JSON data of schema type `hint` into its value: torch's
    `_dict_to_dataclass`, case for case, with each type's case decided once. Dataclass and union
    converters look their fields up on first use (the schema's types are recursive)."""
    cls = _resolve_schema_cls(hint)
    if isinstance(cls, str):
        raise TypeError(f"unresolved schema type {cls!r}")
    origin = typing.get_origin(cls)
    if origin is Annotated:
        return _converter(cls.__origin__)
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(cls):
        args = typing.get_args(cls)
        if len(args) != 2:
            raise TypeError(f"expected Optional[T], got {cls}")
        inner = _converter(args[0])
        return lambda data: None if data is None else inner(data)
    if isinstance(cls, type) and issubclass(cls, _Union):
        return _union_converter(cls)
    if dataclasses.is_dataclass(cls):
        return _dataclass_converter(cls)
    return _plain_converter(cls)


def _union_converter(cls: type) -> Callable[[Any], Any]:
    names = [f.name for f in dataclasses.fields(cls)]
    if any(name in ("type", "_type", "create", "value") for name in names):  # _Union.__post_init__'s check, once
        raise TypeError(f"{cls.__name__} uses a reserved field name")
    unset = dict.fromkeys(names)

    def convert(data: Any) -> Any:
        if not isinstance(data, dict) or len(data) != 1:
            raise TypeError(f"a {cls.__name__} is a one-key object, got {type(data).__name__}")
        ((tag, value),) = data.items()
        if tag not in unset:
            raise TypeError(f"{tag!r} is not a member of {cls.__name__}")
        # what `cls.create(tag=value)` makes, without its per-object dataclasses.fields() calls
        # (two per object: 75% of the conversion)
        union = object.__new__(cls)
        union.__dict__.update(unset)
        union.__dict__[tag] = _converter(_type_hints(cls)[tag])(value)
        union._type = _UnionTag.create(tag, cls)
        return union
    return convert


def _dataclass_converter(cls: type) -> Callable[[Any], Any]:
    fields: list[tuple[str, Callable[[Any], Any]]] = []

    def convert(data: Any) -> Any:
        if not fields:
            hints = _type_hints(cls)
            fields.extend((f.name, _converter(hints[f.name])) for f in dataclasses.fields(cls))
        # keys the schema does not know are ignored, as torch does (forward compatibility)
        return cls(**{name: conv(data[name]) for name, conv in fields if name in data})
    return convert


def _plain_converter(cls: Any) -> Callable[[Any], Any]:
    def convert(data: Any) -> Any:
        if isinstance(data, list):
            if not data:
                return data
            item = _converter(typing.get_args(cls)[0])
            return [item(d) for d in data]
        if isinstance(data, dict):
            value = _converter(typing.get_args(cls)[1])
            return {k: value(v) for k, v in data.items()}
        if cls is float:
            return float(data)
        return data
    return convert


def deserialize_program(program: bytes, state_dict: dict[str, torch.Tensor],
                        constants: dict[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """The ExportedProgram that torch.export's serializer wrote as `program` (its JSON), over the
    given state dict and constants; what `torch._export.serde.serialize.deserialize` returns."""
    serialized = _converter(schema.ExportedProgram)(json.loads(program.decode("utf-8")))
    return ExportedProgramDeserializer(None).deserialize(serialized, state_dict, constants, None)


__all__ = ["deserialize_program"]
