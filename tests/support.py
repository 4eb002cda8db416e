"""Helpers shared by the test modules (no tests here).

References are computed independently of the code under test: MiniLM straight from transformers
with the pooling written out here, decoders with transformers' own `generate`.
"""

from __future__ import annotations

import functools
import socket
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@functools.lru_cache(maxsize=1)
def _minilm():
    from transformers import AutoModel, AutoTokenizer

    from cluster.models.bert import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path()), AutoModel.from_pretrained(minilm_path()).eval()


def minilm_tokens(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, token_type_ids) of `texts`, padded to the longest."""
    enc = _minilm()[0](list(texts), padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


def minilm_embeddings(texts: Sequence[str]) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings as sentence-transformers defines them: the mean of the
    token states under the attention mask, L2-normalised (transformers' BertModel, unsharded)."""
    ids, mask, types = minilm_tokens(texts)
    with torch.no_grad():
        states = _minilm()[1](input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def paraphrase_logits(first: str, second: str) -> np.ndarray:
    """The shipped paraphrase head's logits [different, paraphrase]: +-10 * (cosine - 0.5)."""
    a, b = minilm_embeddings([first, second])
    score = 10.0 * (float(a @ b) - 0.5)
    return np.array([-score, score], dtype=np.float32)
