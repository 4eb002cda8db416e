"""BERT-family encoders from Hugging Face checkpoints, for the current TP rank: embedders and classifiers.

Built from transformers' own classes with the attention and feed-forward blocks swapped for
parallel ones (`cluster.models.bert.parallelize_bert`; RoBERTa's blocks have BERT's layout), so a
checkpoint loads by its own key names. Every model takes (input_ids, attention_mask, token_type_ids)
and returns one tensor: sentence embeddings [batch, hidden] or class logits [batch, labels].
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cluster.models.bert import SentenceEmbedder, parallelize_bert, pooling_config

# architecture -> (transformers family, base model attribute of its task classes)
ENCODERS = {
    "BertModel": ("bert", "bert"),
    "BertForSequenceClassification": ("bert", "bert"),
    "RobertaModel": ("roberta", "roberta"),
    "RobertaForSequenceClassification": ("roberta", "roberta"),
}


def encoder_config(folder: str | os.PathLike) -> Any:
    """The transformers config of an encoder folder, set to SDPA attention (what gets traced)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(Path(folder))
    config._attn_implementation = "sdpa"
    return config


def build_encoder(architecture: str, task: str, config: Any, tensor_parallel: bool = True,
                  pooling: dict | None = None) -> tuple[torch.nn.Module, torch.nn.Module, str, tuple[str, ...]]:
    """(served module, module the weights load into, key prefix to strip, key prefixes to drop).

    Embed: the base model without its pooler, pooled as `pooling` says (the weights of a classifier
    checkpoint load without its head). Classify: the whole sequence-classification model.
    """
    import transformers

    family, base = ENCODERS[architecture]
    prefix = "Bert" if family == "bert" else "Roberta"
    if task == "embed":
        encoder = getattr(transformers, f"{prefix}Model")(config, add_pooling_layer=False)
        if tensor_parallel:
            parallelize_bert(encoder, config)
        drop = ("pooler.", "classifier.")
        return SentenceEmbedder(encoder, pooling or {}).eval(), encoder, f"{base}.", drop
    classifier = getattr(transformers, f"{prefix}ForSequenceClassification")(config)
    if tensor_parallel:
        parallelize_bert(getattr(classifier, base), config)
    return SequenceClassifier(classifier, uses_token_types=family == "bert" or config.type_vocab_size > 1).eval(), \
        classifier, "", ()


class SequenceClassifier(torch.nn.Module):
    """A transformers sequence classifier returning (logits,) from (ids, mask, token types)."""

    def __init__(self, classifier: torch.nn.Module, uses_token_types: bool) -> None:
        super().__init__()
        self.classifier = classifier
        # RoBERTa is trained with one token type: a pair's second-segment types would index past it
        self.uses_token_types = uses_token_types

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> tuple[torch.Tensor]:
        types = token_type_ids if self.uses_token_types else None
        return (self.classifier(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=types,
                                return_dict=False)[0],)


def encoder_from_checkpoint(folder: str | os.PathLike, architecture: str, task: str,
                            dtype: str | None = None) -> tuple[torch.nn.Module, dict]:
    """(model, io_aliases) for this rank from a transformers BERT/RoBERTa folder: pass it, bound with
    functools.partial, to parallel_model_trace."""
    from cluster.models.hf_weights import assign_whole, read_weights, rename
    from cluster.parallel_layers import parallel_state

    folder = Path(folder)
    config = encoder_config(folder)
    model, target, strip, drop = build_encoder(architecture, task, config, pooling=pooling_config(folder))
    state = rename(read_weights(folder), strip, drop)
    assign_whole(target, state, str(folder), parallel_state.get_tensor_model_parallel_rank(),
                 parallel_state.get_tensor_model_parallel_size())
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    return model.eval(), {}
