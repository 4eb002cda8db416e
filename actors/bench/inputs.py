"""The guide's three sentences (the demo embeds them too) and their MiniLM tokenization."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SENTENCES = [
    "The company HuggingFace is based in New York City",
    "Apples are especially bad for your health",
    "HuggingFace's headquarters are situated in Manhattan",
]


def minilm_inputs(length: int, batch: int = 3) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, token_type_ids) of the first `batch` sentences, padded to `length`."""
    from transformers import AutoTokenizer

    from cluster.models.bert import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    enc = tokenizer((SENTENCES * batch)[:batch], max_length=length, padding="max_length", truncation=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
