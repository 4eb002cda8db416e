"""Bucket kernels and bucket planning: pure functions, no cluster.

A bucket kernel (the guide's autobucketing contract) takes the list of input tensors and returns
`(padded_tensors, torch.tensor([bucket_idx]))`. `SequenceBucketKernel` is the common case ready
made: pad the sequence dim of the first `num_inputs` inputs to the smallest bucket that fits.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from cluster.errors import BucketError
from cluster.signature import Signature, TensorSpec, describe_signature


def propose_buckets(max_length: int, min_length: int = 16) -> list[int]:
    """Powers of two from min_length up to max_length, max_length always included (NxD Inference)."""
    if max_length < 1 or min_length < 1:
        raise ValueError(f"bucket lengths must be positive, got min {min_length}, max {max_length}")
    buckets = []
    length = 1
    while length < max_length:
        if length >= min_length:
            buckets.append(length)
        length *= 2
    buckets.append(max_length)
    return buckets


class SequenceBucketKernel(torch.nn.Module):
    """Pads dim `dim` of the first `num_inputs` inputs to the smallest of `buckets` that fits."""

    def __init__(self, buckets: List[int], num_inputs: int, dim: int = 1, pad_value: int = 0) -> None:
        super().__init__()
        if not buckets or sorted(buckets) != list(buckets) or len(set(buckets)) != len(buckets):
            raise ValueError(f"buckets must be a non-empty increasing list, got {buckets}")
        self.buckets = list(buckets)
        self.num_inputs = num_inputs
        self.dim = dim
        self.pad_value = pad_value

    def forward(self, tensors: List[torch.Tensor]) -> Tuple[List[torch.Tensor], torch.Tensor]:
        length = tensors[0].shape[self.dim]
        bucket_idx = len(self.buckets)  # out of range: nothing fits, the caller reports it
        for idx, bucket in enumerate(self.buckets):
            if length <= bucket:
                bucket_idx = idx
                break
        if bucket_idx == len(self.buckets):
            return tensors, torch.tensor([bucket_idx])
        target = self.buckets[bucket_idx]
        padded: List[torch.Tensor] = []
        for i, tensor in enumerate(tensors):
            if i < self.num_inputs:
                shape = list(tensor.shape)
                shape[self.dim] = target - tensor.shape[self.dim]
                pad = torch.full(shape, self.pad_value, dtype=tensor.dtype)
                padded.append(torch.cat([tensor, pad], dim=self.dim))
            else:
                padded.append(tensor)
        return padded, torch.tensor([bucket_idx])


def sequence_bucket_kernel(buckets: Sequence[int], num_inputs: int, dim: int = 1, pad_value: int = 0):
    """A TorchScript SequenceBucketKernel: pass `lambda: sequence_bucket_kernel(...)` to BucketModelConfig."""
    return torch.jit.script(SequenceBucketKernel(list(buckets), num_inputs, dim, pad_value))


def check_fits(inputs: Sequence[torch.Tensor], buckets: Sequence[Signature]) -> None:
    """Refuse inputs that no bucket can hold: count, dtype, rank, or a dim above every bucket's."""
    largest = max(buckets, key=lambda sig: sum(_numel(spec.shape) for spec in sig))
    for b in buckets:
        if len(inputs) >= len(b) and all(
            t.dim() == spec.shape.__len__() and str(t.dtype).removeprefix("torch.") == spec.dtype
            for t, spec in zip(inputs, b)
        ):
            break
    else:
        got = describe_signature(tuple(_spec(t) for t in inputs))
        raise BucketError(f"inputs {got} match no bucket; the buckets take {_all(buckets)}")
    for i, tensor in enumerate(inputs):
        for d, size in enumerate(tensor.shape):
            limit = max((sig[i].shape[d] for sig in buckets if i < len(sig) and d < len(sig[i].shape)), default=None)
            if limit is not None and size > limit:
                raise BucketError(
                    f"input {i} has size {size} in dim {d}, above the largest bucket "
                    f"{describe_signature(largest)} (max {limit}): shorten the input or trace a larger bucket"
                )


def run_kernel(kernel, inputs: Sequence[torch.Tensor], buckets: Sequence[Signature]) -> tuple[int, tuple[torch.Tensor, ...]]:
    """Run a bucket kernel and check what it returned against the traced bucket signatures."""
    check_fits(inputs, buckets)
    padded, index = kernel(list(inputs))
    if index.numel() != 1:
        raise BucketError(f"bucket kernel returned bucket index {index.tolist()}; it must return torch.tensor([idx])")
    idx = int(index.item())
    if not 0 <= idx < len(buckets):
        raise BucketError(f"bucket kernel picked bucket {idx}, but the model has buckets 0..{len(buckets) - 1}: {_all(buckets)}")
    padded = tuple(padded)
    got = tuple(_spec(t) for t in padded)
    if got != tuple(buckets[idx]):
        raise BucketError(
            f"bucket kernel padded the inputs to {describe_signature(got)}, but bucket {idx} was traced "
            f"for {describe_signature(buckets[idx])}"
        )
    return idx, padded


def _spec(tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec.of(tensor)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _all(buckets: Sequence[Signature]) -> str:
    return ", ".join(f"{i}: {describe_signature(sig)}" for i, sig in enumerate(buckets))


class BatchSequenceBucketKernel(torch.nn.Module):
    """Pads dim 0 (batch) and dim 1 (sequence) of the first `num_inputs` inputs to the smallest
    fitting pair of buckets; bucket index = batch_index * len(seq_buckets) + seq_index."""

    def __init__(self, batch_buckets: List[int], seq_buckets: List[int], num_inputs: int, pad_value: int = 0) -> None:
        super().__init__()
        for name, buckets in (("batch_buckets", batch_buckets), ("seq_buckets", seq_buckets)):
            if not buckets or sorted(buckets) != list(buckets) or len(set(buckets)) != len(buckets):
                raise ValueError(f"{name} must be a non-empty increasing list, got {buckets}")
        self.batch_buckets = list(batch_buckets)
        self.seq_buckets = list(seq_buckets)
        self.num_inputs = num_inputs
        self.pad_value = pad_value

    def forward(self, tensors: List[torch.Tensor]) -> Tuple[List[torch.Tensor], torch.Tensor]:
        batch = tensors[0].shape[0]
        length = tensors[0].shape[1]
        bi = len(self.batch_buckets)
        for i, b in enumerate(self.batch_buckets):
            if batch <= b:
                bi = i
                break
        si = len(self.seq_buckets)
        for i, s in enumerate(self.seq_buckets):
            if length <= s:
                si = i
                break
        if bi == len(self.batch_buckets) or si == len(self.seq_buckets):
            return tensors, torch.tensor([len(self.batch_buckets) * len(self.seq_buckets)])
        target_b = self.batch_buckets[bi]
        target_s = self.seq_buckets[si]
        padded: List[torch.Tensor] = []
        for i, tensor in enumerate(tensors):
            if i < self.num_inputs:
                out = torch.full([target_b, target_s], self.pad_value, dtype=tensor.dtype)
                out[: tensor.shape[0], : tensor.shape[1]] = tensor
                padded.append(out)
            else:
                padded.append(tensor)
        return padded, torch.tensor([bi * len(self.seq_buckets) + si])


def batch_sequence_bucket_kernel(batch_buckets: Sequence[int], seq_buckets: Sequence[int], num_inputs: int, pad_value: int = 0):
    """A TorchScript BatchSequenceBucketKernel; trace one example per (batch, seq) pair, batch-major."""
    return torch.jit.script(BatchSequenceBucketKernel(list(batch_buckets), list(seq_buckets), num_inputs, pad_value))


class ShapeBucketKernel(torch.nn.Module):
    """Pads every dim of every input with zeros to the smallest bucket that holds them all (by elements)."""

    def __init__(self, buckets: List[List[List[int]]]) -> None:
        super().__init__()
        self.buckets = buckets

    def forward(self, tensors: List[torch.Tensor]) -> Tuple[List[torch.Tensor], torch.Tensor]:
        best = len(self.buckets)
        best_size = -1
        for idx, shapes in enumerate(self.buckets):
            fits = len(shapes) == len(tensors)
            size = 0
            if fits:
                for tensor, shape in zip(tensors, shapes):
                    if tensor.dim() != len(shape):
                        fits = False
                        break
                    n = 1
                    for d in range(len(shape)):
                        if tensor.shape[d] > shape[d]:
                            fits = False
                        n = n * shape[d]
                    size += n
            if fits and (best_size < 0 or size < best_size):
                best, best_size = idx, size
        if best == len(self.buckets):
            return tensors, torch.tensor([best])
        padded: List[torch.Tensor] = []
        for tensor, shape in zip(tensors, self.buckets[best]):
            pad: List[int] = []
            for d in range(tensor.dim() - 1, -1, -1):
                pad.append(0)
                pad.append(shape[d] - tensor.shape[d])
            padded.append(torch.nn.functional.pad(tensor, pad))
        return padded, torch.tensor([best])


def shape_bucket_kernel(buckets: Sequence[Sequence[Sequence[int]]]):
    """A TorchScript ShapeBucketKernel over bucket input shapes (one list of shapes per bucket)."""
    return torch.jit.script(ShapeBucketKernel([[list(s) for s in b] for b in buckets]))
