from typing import List

import pytest
import torch

from cluster.buckets import SequenceBucketKernel, propose_buckets, run_kernel, sequence_bucket_kernel
from cluster.errors import BucketError
from cluster.signature import TensorSpec

SIGS = [tuple(TensorSpec((1, n), "int64") for _ in range(2)) for n in (4, 16)]


def test_propose_buckets_powers_of_two():
    assert propose_buckets(512, min_length=128) == [128, 256, 512]
    assert propose_buckets(300, min_length=64) == [64, 128, 256, 300]
    assert propose_buckets(8, min_length=16) == [8]
    with pytest.raises(ValueError):
        propose_buckets(0)


def test_sequence_kernel_pads_the_first_inputs_to_the_smallest_fit():
    kernel = sequence_bucket_kernel([4, 16], num_inputs=2)
    ids = torch.arange(1, 6).unsqueeze(0)
    padded, idx = kernel([ids, ids.clone(), torch.ones(3)])
    assert idx.tolist() == [1]
    assert padded[0].shape == (1, 16) and padded[0][0, :5].tolist() == [1, 2, 3, 4, 5] and padded[0][0, 5:].sum() == 0
    assert padded[2].shape == (3,)  # inputs past num_inputs pass through


def test_run_kernel_checks_what_the_kernel_returns():
    kernel = sequence_bucket_kernel([4, 16], num_inputs=2)
    x = torch.ones(1, 3, dtype=torch.long)
    idx, padded = run_kernel(kernel, (x, x), SIGS)
    assert idx == 0 and [t.shape for t in padded] == [(1, 4), (1, 4)]
    with pytest.raises(BucketError, match=r"size 17 in dim 1, above the largest bucket \(int64\[1, 16\], int64\[1, 16\]\)"):
        run_kernel(kernel, (torch.ones(1, 17, dtype=torch.long),) * 2, SIGS)
    with pytest.raises(BucketError, match="match no bucket"):
        run_kernel(kernel, (torch.ones(1, 3),) * 2, SIGS)


@torch.jit.script
def _always_bucket_seven(tensors: List[torch.Tensor]):
    return tensors, torch.tensor([7])


@torch.jit.script
def _bad_padding(tensors: List[torch.Tensor]):
    return tensors, torch.tensor([1])


def test_a_kernel_index_out_of_range_or_wrong_padding_is_an_error():
    x = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(BucketError, match=r"picked bucket 7, but the model has buckets 0..1"):
        run_kernel(_always_bucket_seven, (x, x), SIGS)
    with pytest.raises(BucketError, match=r"padded the inputs to \(int64\[1, 4\], int64\[1, 4\]\), but bucket 1 was traced for"):
        run_kernel(_bad_padding, (x, x), SIGS)


def test_kernel_rejects_bad_bucket_lists():
    with pytest.raises(ValueError, match="increasing"):
        SequenceBucketKernel([16, 4], 1)
