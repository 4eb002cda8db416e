"""Task inputs for the encoder models (BERT family) from token ids: what the gateway's batchers
send to a served model's forward. Rows are padded to the longest; the bucket kernel pads further.

    embed:    (input_ids, attention_mask, token_type_ids)
    joint:    the same, with the tokenizer's token types (a text pair in one sequence)
    pair:     both texts of a bi-encoder, (ids_a, mask_a, types_a, ids_b, mask_b, types_b)
"""

from __future__ import annotations

from typing import Sequence

import torch


def pad_rows(rows: Sequence[Sequence[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape [len(rows), length]: each row's tokens, then zeros."""
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def embed_inputs(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, ...]:
    ids, mask = pad_rows(rows, max(map(len, rows)))
    return ids, mask, torch.zeros_like(ids)


def joint_inputs(rows: Sequence[Sequence[int]], token_types: Sequence[Sequence[int]]) -> tuple[torch.Tensor, ...]:
    ids, mask = pad_rows(rows, max(map(len, rows)))
    types, _ = pad_rows(token_types, ids.shape[1])
    return ids, mask, types


def pair_inputs(first: Sequence[Sequence[int]], second: Sequence[Sequence[int]]) -> tuple[torch.Tensor, ...]:
    length = max(max(map(len, first)), max(map(len, second)))
    ids_a, mask_a = pad_rows(first, length)
    ids_b, mask_b = pad_rows(second, length)
    return ids_a, mask_a, torch.zeros_like(ids_a), ids_b, mask_b, torch.zeros_like(ids_b)
