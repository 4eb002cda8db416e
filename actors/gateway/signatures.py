"""What a served model's Infer takes and returns, by name, and how a request's tensors are matched to it.

Names come from the model's serving.json (`extra.input_names` / `extra.output_names`, one per
tensor) or, without them, from its task: the encoders take `input_ids, attention_mask,
token_type_ids` (a bi-encoder pair: the same with `_a` and `_b`) and return `embedding` or
`logits`; decoders' graphs take `input_ids, position_ids, cache_mask, logit_index`. Anything else
is `input_N` / `output_N`. No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cluster.errors import InputError
from cluster.serving import ServingSpec

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DECODER_INPUTS = ("input_ids", "position_ids", "cache_mask", "logit_index")

T = TypeVar("T")


@dataclass(frozen=True)
class TensorInfo:
    """One input or output: its name, dtype (the wire's names: float32, int64, ...) and shape (-1: varies)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


def _declared(spec: ServingSpec, key: str, count: int) -> list[str] | None:
    names = spec.extra.get(key)
    if isinstance(names, list) and len(names) == count and len(set(names)) == count and \
            all(isinstance(n, str) and n for n in names):
        return list(names)
    return None


def input_names(spec: ServingSpec, count: int) -> list[str]:
    """The names of a model's `count` inputs, in the order its forward takes them."""
    declared = _declared(spec, "input_names", count)
    if declared:
        return declared
    if spec.task == "classify" and spec.pair_encoding == "separate" and count == 2 * len(TEXT_INPUTS):
        return [f"{name}_{side}" for side in "ab" for name in TEXT_INPUTS]
    if spec.task in ("embed", "classify") and count == len(TEXT_INPUTS):
        return list(TEXT_INPUTS)
    if spec.task == "generate" and count == len(DECODER_INPUTS):
        return list(DECODER_INPUTS)
    return [f"input_{i}" for i in range(count)]


def output_names(spec: ServingSpec, count: int) -> list[str]:
    """The names of a model's `count` outputs, in the order its forward returns them."""
    declared = _declared(spec, "output_names", count)
    if declared:
        return declared
    if count == 1 and spec.task in ("embed", "classify"):
        return ["embedding" if spec.task == "embed" else "logits"]
    return [f"output_{i}" for i in range(count)]


def input_specs(spec: ServingSpec, buckets: Sequence[Sequence[dict[str, Any]]]) -> list[TensorInfo]:
    """The signature Infer takes: the first bucket's inputs, with -1 for dimensions that differ between buckets."""
    if not buckets:
        return []
    names = input_names(spec, len(buckets[0]))
    infos = []
    for i, first in enumerate(buckets[0]):
        dims = tuple(d if all(len(sig[i]["shape"]) > j and sig[i]["shape"][j] == d for sig in buckets) else -1
                     for j, d in enumerate(first["shape"]))
        infos.append(TensorInfo(names[i], first["dtype"], dims))
    return infos


def merge_output_specs(spec: ServingSpec, probes: Sequence[tuple[int, Sequence[Any]]]) -> list[TensorInfo]:
    """Output specs from forwards on example inputs: (rows of that example, its output arrays) per
    probe. Dimension 0 is -1 where it followed the rows; other dimensions that differ are -1."""
    if not probes:
        return []
    count = len(probes[0][1])
    if any(len(outputs) != count for _, outputs in probes):
        return []
    names = output_names(spec, count)
    infos = []
    for i in range(count):
        shapes = [(rows, tuple(outputs[i].shape)) for rows, outputs in probes]
        first = shapes[0][1]
        dims = []
        for j, d in enumerate(first):
            follows_rows = j == 0 and all(len(s) > 0 and s[0] == rows for rows, s in shapes)
            same = all(len(s) > j and s[j] == d for _, s in shapes)
            dims.append(-1 if follows_rows or not same else d)
        infos.append(TensorInfo(names[i], str(probes[0][1][i].dtype), tuple(dims)))
    return infos


def order_inputs(model: str, expected: Sequence[str], sent: Sequence[tuple[str, T]]) -> list[T]:
    """The sent values in the order the model takes them.

    By name when every sent name is one of `expected` (all of them must then be there, once); by
    position when none is (clients that name inputs their own way, or not at all). A mix is refused:
    it is most likely a misspelt name.
    """
    names = [name for name, _ in sent]
    known = [n for n in names if n in expected]
    if not known:
        return [value for _, value in sent]
    if len(known) < len(names):
        strangers = [n for n in names if n not in expected]
        raise InputError(f"model {model!r}: inputs {strangers} are not among its inputs {list(expected)}; name every "
                         "input as GetModel lists them, or leave the names empty to match by position")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"model {model!r}: inputs {repeated} sent more than once; send each input once")
    missing = [n for n in expected if n not in names]
    if missing:
        raise InputError(f"model {model!r}: missing inputs {missing}; it takes {list(expected)}")
    by_name = dict(sent)
    return [by_name[n] for n in expected]
