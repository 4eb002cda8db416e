"""A tensor-parallel T5 (the guide's T5 sample): encoder, decoder and cross-attention state on the ranks.

Module names match transformers' T5ForConditionalGeneration, so its checkpoints load with the same
whole-state-dict slicing as the Llama (`assign_whole`): attention q/k/v and the feed-forward's input
projections are column-parallel over heads / d_ff, o and wo row-parallel, each layer's relative
position bias table is split over heads (each rank biases its own heads), layer norms replicated.
Both feed-forwards are supported: `relu` (T5) and gated-gelu (T5 v1.1, `gelu_new`), as configured.

A T5 follows the decoder contract of `cluster.models.llama`, so the generation loop, continuous
batching, multi-step decoding and the gateway serve it unchanged:

    forward(input_ids [B, n], position_ids [B, n], cache_mask [B, L], logit_index [B, m])
      -> (logits [B, 1, vocab], *state rows)

- prefill (n = the prompt bucket > 1): the encoder reads the prompt (the loop's prompt is the
  encoder input); each decoder layer's cross-attention keys/values of it, the encoder mask and the
  row's position offset become the row's state; the decoder then runs its first step (the
  decoder_start token at decoder position 0) and returns its logits: the first generated token.
  Rows not being prefilled (position = the scratch slot) keep their state.
- decode (n = 1): the token at loop position p is decoder position p - offset (offset = prompt
  length - 1, so the token after the prompt is decoder position 1): self-attention over the
  decoder's own cache (relative position bias, causal), cross-attention over the row's encoder
  keys/values. The cross state is returned with no rows (nothing to copy: decode leaves it as it is).

No verify graphs: a T5 is served target-only (speculation needs a draft that shares its encoder).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cluster.errors import ShardingError, UnsupportedModel
from cluster.parallel_layers import layers, parallel_state

ACTIVATIONS = {"relu": F.relu, "gelu_new": functools.partial(F.gelu, approximate="tanh"),
               "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"), "gelu": F.gelu, "silu": F.silu}


@dataclass(frozen=True)
class T5Shape:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "relu"
    is_gated_act: bool = False
    tie_word_embeddings: bool = True
    decoder_start_token_id: int = 0
    eos_token_id: int | None = 1

    @classmethod
    def from_config(cls, data: dict) -> "T5Shape":
        # as transformers' T5Config reads it: "[gated-]ACT", with gated-gelu meaning gelu_new
        projection = data.get("feed_forward_proj", "relu")
        parts = projection.split("-")
        gated = parts[0] == "gated" and len(parts) == 2
        act = "gelu_new" if projection == "gated-gelu" else parts[-1]
        if act not in ACTIVATIONS or len(parts) > 2 or (len(parts) == 2 and not gated):
            raise UnsupportedModel(f"T5: feed_forward_proj {projection!r} is not supported; supported: relu, gated-gelu "
                                   f"(and [gated-]{{{', '.join(sorted(ACTIVATIONS))}}})")
        start = data.get("decoder_start_token_id")
        return cls(int(data["vocab_size"]), int(data["d_model"]), int(data["d_kv"]), int(data["d_ff"]),
                   int(data["num_layers"]), int(data.get("num_decoder_layers") or data["num_layers"]),
                   int(data["num_heads"]), int(data.get("relative_attention_num_buckets", 32)),
                   int(data.get("relative_attention_max_distance", 128)), float(data.get("layer_norm_epsilon", 1e-6)),
                   act, gated, bool(data.get("tie_word_embeddings", True)),
                   int(start if start is not None else data.get("pad_token_id") or 0), data.get("eos_token_id", 1))


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias, in float32 (transformers' T5LayerNorm)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


class RelativeBias(nn.Module):
    """The relative position bias table [buckets, heads], split over heads (this rank's columns)."""

    def __init__(self, buckets: int, heads: int) -> None:
        super().__init__()
        tp = parallel_state.get_tensor_model_parallel_size()
        self.weight = nn.Parameter(torch.zeros(buckets, heads // tp))
        self.partition_dims = {"weight": 1}


def relative_bucket(relative: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int) -> torch.Tensor:
    """transformers' T5Attention._relative_position_bucket (relative = key position - query position)."""
    out = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        out = out + (relative > 0).to(torch.long) * buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    exact = buckets // 2
    small = relative < exact
    large = exact + (torch.log(relative.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (buckets - exact)).to(torch.long)
    large = torch.clamp(large, max=buckets - 1)
    return out + torch.where(small, relative, large)


class T5Attention(nn.Module):
    def __init__(self, shape: T5Shape, has_bias: bool) -> None:
        super().__init__()
        tp = parallel_state.get_tensor_model_parallel_size()
        if shape.num_heads % tp:
            raise ShardingError(f"T5: {shape.num_heads} heads do not divide by tp_degree {tp}; pick a tp_degree that divides them")
        inner = shape.num_heads * shape.d_kv
        self.heads, self.d_kv = shape.num_heads // tp, shape.d_kv
        self.q = layers.ColumnParallelLinear(shape.d_model, inner, bias=False, gather_output=False)
        self.k = layers.ColumnParallelLinear(shape.d_model, inner, bias=False, gather_output=False)
        self.v = layers.ColumnParallelLinear(shape.d_model, inner, bias=False, gather_output=False)
        self.o = layers.RowParallelLinear(inner, shape.d_model, bias=False, input_is_parallel=True)
        if has_bias:
            self.relative_attention_bias = RelativeBias(shape.relative_attention_num_buckets, shape.num_heads)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n, heads * d_kv] -> [B, heads, n, d_kv]."""
        return x.view(x.shape[0], x.shape[1], self.heads, self.d_kv).transpose(1, 2)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Unscaled dot-product attention (T5) with an additive bias; back to [B, n, d_model] through o."""
        scores = (q @ keys.transpose(-1, -2)).float() + bias
        out = torch.softmax(scores, dim=-1).to(q.dtype) @ values
        return self.o(out.transpose(1, 2).reshape(q.shape[0], q.shape[2], self.heads * self.d_kv))


class T5FF(nn.Module):
    def __init__(self, shape: T5Shape) -> None:
        super().__init__()
        column = dict(bias=False, gather_output=False)
        if shape.is_gated_act:
            self.wi_0 = layers.ColumnParallelLinear(shape.d_model, shape.d_ff, **column)
            self.wi_1 = layers.ColumnParallelLinear(shape.d_model, shape.d_ff, **column)
        else:
            self.wi = layers.ColumnParallelLinear(shape.d_model, shape.d_ff, **column)
        self.wo = layers.RowParallelLinear(shape.d_ff, shape.d_model, bias=False, input_is_parallel=True)
        self.act = ACTIVATIONS[shape.dense_act_fn]
        self.gated = shape.is_gated_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(inner)


class _Sub(nn.Module):
    """One of a block's sub-layers, named as transformers names them (layer.N.SelfAttention, ...)."""

    def __init__(self, shape: T5Shape, name: str, module: nn.Module) -> None:
        super().__init__()
        self.layer_norm = T5LayerNorm(shape.d_model, shape.layer_norm_epsilon)
        setattr(self, name, module)


class T5Block(nn.Module):
    def __init__(self, shape: T5Shape, decoder: bool, first: bool) -> None:
        super().__init__()
        subs = [_Sub(shape, "SelfAttention", T5Attention(shape, has_bias=first))]
        if decoder:
            subs.append(_Sub(shape, "EncDecAttention", T5Attention(shape, has_bias=False)))
        subs.append(_Sub(shape, "DenseReluDense", T5FF(shape)))
        self.layer = nn.ModuleList(subs)

    @property
    def self_attention(self) -> T5Attention:
        return self.layer[0].SelfAttention


class T5Stack(nn.Module):
    def __init__(self, shape: T5Shape, decoder: bool) -> None:
        super().__init__()
        count = shape.num_decoder_layers if decoder else shape.num_layers
        self.block = nn.ModuleList(T5Block(shape, decoder, i == 0) for i in range(count))
        self.final_layer_norm = T5LayerNorm(shape.d_model, shape.layer_norm_epsilon)


class T5ForConditionalGeneration(nn.Module):
    """TP T5 for the current rank; `io_aliases()` declares its decoder caches and encoder state."""

    def __init__(self, shape: T5Shape, max_batch: int = 4, max_cache: int = 512, max_encoder: int = 128) -> None:
        super().__init__()
        self.shape, self.max_batch, self.max_cache, self.max_encoder = shape, max_batch, max_cache, max_encoder
        self.shared = layers.ParallelEmbedding(shape.vocab_size, shape.d_model)
        self.encoder = T5Stack(shape, decoder=False)
        self.decoder = T5Stack(shape, decoder=True)
        self.lm_head = layers.ColumnParallelLinear(shape.d_model, shape.vocab_size, bias=False, gather_output=True)
        self.full_state_outputs = False  # True where state outputs must have the state's shape (Neuron aliasing)
        heads = self.decoder.block[0].self_attention.heads
        for i in range(shape.num_decoder_layers):
            for name, length in (("self_k", max_cache), ("self_v", max_cache), ("cross_k", max_encoder), ("cross_v", max_encoder)):
                self.register_buffer(f"{name}_{i}", torch.zeros(max_batch, heads, length, shape.d_kv), persistent=False)
        self.register_buffer("encoder_mask", torch.zeros(max_batch, max_encoder), persistent=False)
        self.register_buffer("offset", torch.zeros(max_batch, dtype=torch.long), persistent=False)

    # -- the state ----------------------------------------------------------------------------
    def state_names(self) -> list[str]:
        names = []
        for i in range(self.shape.num_decoder_layers):
            names += [f"self_k_{i}", f"self_v_{i}", f"cross_k_{i}", f"cross_v_{i}"]
        return names + ["encoder_mask", "offset"]

    def io_aliases(self) -> dict[torch.Tensor, int]:
        return {getattr(self, name): 1 + i for i, name in enumerate(self.state_names())}

    def _out(self, name: str, rows: torch.Tensor | None, batch: int) -> torch.Tensor:
        """A state output: its new rows [:batch], or none (`rows` None: unchanged), or the whole state."""
        state = getattr(self, name)
        if rows is None:
            rows = state[:batch] if self.full_state_outputs else state[:0]
        return torch.cat([rows, state[batch:]], dim=0) if self.full_state_outputs else rows

    # -- graphs -------------------------------------------------------------------------------
    def forward(self, input_ids, position_ids, cache_mask, logit_index):
        if input_ids.shape[1] > 1:
            return self._prefill(input_ids, position_ids, cache_mask)
        return self._decode(input_ids, position_ids, cache_mask)

    def _prefill(self, input_ids, position_ids, cache_mask):
        batch, n = input_ids.shape
        scratch = self.max_cache - 1
        new = position_ids[:, 0] != scratch  # rows being prefilled; the others keep their state
        mask = cache_mask.to(torch.float32)
        h = self.shared(input_ids)
        positions = torch.arange(n, device=h.device)
        table = self.encoder.block[0].self_attention.relative_attention_bias.weight
        buckets = relative_bucket(positions[None, :] - positions[:, None], True, self.shape.relative_attention_num_buckets,
                                  self.shape.relative_attention_max_distance)
        bias = table[buckets].permute(2, 0, 1)[None].float() + (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min
        for block in self.encoder.block:
            sub = block.layer[0]
            x = sub.layer_norm(h)
            attn = sub.SelfAttention
            h = h + attn.attend(attn.split(attn.q(x)), attn.split(attn.k(x)), attn.split(attn.v(x)), bias)
            h = h + block.layer[1].DenseReluDense(block.layer[1].layer_norm(h))
        encoded = self.encoder.final_layer_norm(h)
        pad = self.max_encoder - n
        keep = new[:, None, None, None]
        cross = {}
        for i, block in enumerate(self.decoder.block):
            attn = block.layer[1].EncDecAttention
            for name, proj in (("cross_k", attn.k), ("cross_v", attn.v)):
                rows = F.pad(attn.split(proj(encoded)), (0, 0, 0, pad))
                cross[f"{name}_{i}"] = torch.where(keep, rows, getattr(self, f"{name}_{i}")[:batch])
        encoder_mask = torch.where(new[:, None], F.pad(mask, (0, pad)), self.encoder_mask[:batch])
        offset = torch.where(new, cache_mask.sum(1) - 1, self.offset[:batch])
        start = torch.full_like(input_ids[:, :1], self.shape.decoder_start_token_id)
        dec_pos = torch.where(new, 0, scratch)[:, None]
        logits, own = self._decoder_step(start, dec_pos, 1, lambda i, name: cross[f"{name}_{i}"], encoder_mask)
        outs = []
        for i in range(self.shape.num_decoder_layers):
            outs += [self._out(f"self_k_{i}", own[2 * i], batch), self._out(f"self_v_{i}", own[2 * i + 1], batch),
                     self._out(f"cross_k_{i}", cross[f"cross_k_{i}"], batch),
                     self._out(f"cross_v_{i}", cross[f"cross_v_{i}"], batch)]
        return (logits, *outs, self._out("encoder_mask", encoder_mask, batch), self._out("offset", offset, batch))

    def _decode(self, input_ids, position_ids, cache_mask):
        batch = input_ids.shape[0]
        scratch = self.max_cache - 1
        real = position_ids != scratch
        dec_pos = torch.where(real, position_ids - self.offset[:batch, None], scratch)
        logits, own = self._decoder_step(input_ids, dec_pos, cache_mask.shape[1],
                                         lambda i, name: getattr(self, f"{name}_{i}")[:batch], self.encoder_mask[:batch])
        outs = []
        for i in range(self.shape.num_decoder_layers):
            outs += [self._out(f"self_k_{i}", own[2 * i], batch), self._out(f"self_v_{i}", own[2 * i + 1], batch),
                     self._out(f"cross_k_{i}", None, batch), self._out(f"cross_v_{i}", None, batch)]
        return (logits, *outs, self._out("encoder_mask", None, batch), self._out("offset", None, batch))

    def _decoder_step(self, ids, dec_pos, span, cross, encoder_mask):
        """One decoder token per row at decoder positions dec_pos [B, 1] (the scratch slot for rows
        that feed nothing): (logits [B, 1, V], [self_k rows, self_v rows] per layer)."""
        batch = ids.shape[0]
        h = self.shared(ids)
        keys_at = torch.arange(span, device=h.device)
        table = self.decoder.block[0].self_attention.relative_attention_bias.weight
        buckets = relative_bucket(keys_at[None, None, :] - dec_pos[:, :, None], False,
                                  self.shape.relative_attention_num_buckets, self.shape.relative_attention_max_distance)
        allowed = keys_at[None, None, :] <= dec_pos[:, :, None]  # [B, 1, span]
        self_bias = table[buckets].permute(0, 3, 1, 2).float().masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        cross_bias = ((1.0 - encoder_mask) * torch.finfo(torch.float32).min)[:, None, None, :]
        index = dec_pos[:, None, :, None].expand(batch, self.decoder.block[0].self_attention.heads, 1, self.shape.d_kv)
        own = []
        for i, block in enumerate(self.decoder.block):
            sub = block.layer[0]
            x = sub.layer_norm(h)
            attn = sub.SelfAttention
            k_rows = getattr(self, f"self_k_{i}")[:batch].scatter(2, index, attn.split(attn.k(x)))
            v_rows = getattr(self, f"self_v_{i}")[:batch].scatter(2, index, attn.split(attn.v(x)))
            h = h + attn.attend(attn.split(attn.q(x)), k_rows[:, :, :span], v_rows[:, :, :span], self_bias)
            own += [k_rows, v_rows]
            sub = block.layer[1]
            x = sub.layer_norm(h)
            attn = sub.EncDecAttention
            h = h + attn.attend(attn.split(attn.q(x)), cross(i, "cross_k"), cross(i, "cross_v"), cross_bias)
            h = h + block.layer[2].DenseReluDense(block.layer[2].layer_norm(h))
        h = self.decoder.final_layer_norm(h)
        if self.shape.tie_word_embeddings:
            h = h * (self.shape.d_model ** -0.5)
        return self.lm_head(h), own


def t5_state_dict(folder: str | os.PathLike, shape: T5Shape) -> dict[str, torch.Tensor]:
    """The whole weights of a transformers T5 folder, named as the modules here: the stacks' own
    copies of the shared embedding dropped, lm_head from the embedding where the config ties them."""
    from cluster.models.hf_weights import read_weights

    return t5_names(read_weights(folder), shape)


def t5_names(state: dict, shape: T5Shape) -> dict:
    """`state` (tensors or shapes) renamed for the modules here (see t5_state_dict)."""
    state = {k: v for k, v in state.items() if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")}
    if shape.tie_word_embeddings and "lm_head.weight" not in state and "shared.weight" in state:
        state["lm_head.weight"] = state["shared.weight"]
    return state


def t5_from_checkpoint(folder: str | os.PathLike, max_batch: int = 4, max_cache: int = 512, max_encoder: int = 128,
                       full_state_outputs: bool = False, dtype: str | None = None) -> tuple[nn.Module, dict]:
    """(model, io_aliases) for this rank from a transformers T5ForConditionalGeneration folder."""
    import json

    from cluster.models.hf_weights import assign_whole, materialize, parameters_on_meta

    folder = Path(folder)
    shape = T5Shape.from_config(json.loads((folder / "config.json").read_text()))
    with parameters_on_meta():  # made in the weights' dtype, filled from the checkpoint (as for the decoders)
        model = T5ForConditionalGeneration(shape, max_batch, max_cache, max_encoder).eval()
    materialize(model, getattr(torch, dtype) if dtype is not None else torch.float32)
    model.full_state_outputs = full_state_outputs
    assign_whole(model, t5_state_dict(folder, shape), str(folder), parallel_state.get_tensor_model_parallel_rank(),
                 parallel_state.get_tensor_model_parallel_size())
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
        model.offset = model.offset.long()
    return model, model.io_aliases()


def trace_t5(folder: str | os.PathLike, tp_degree: int = 2, layout: Any = None, name: str = "t5",
             progress: bool | None = None, dtype: str | None = None, **trace_options: Any) -> Any:
    """Trace a transformers T5 folder for generation (encoder input = the prompt): every prefill and
    decode graph of `layout` (a DecoderLayout without verify graphs), weights separated."""
    import json

    from cluster.buckets import shape_bucket_kernel
    from cluster.generation.layout import DecoderLayout
    from cluster.signature import signature_of
    from cluster.trace import BucketModelConfig, parallel_model_trace
    from cluster.trace.backends import resolve_backend

    layout = layout or DecoderLayout(prompt_buckets=(32, 128), cache_buckets=(256, 512))
    if layout.verify_tokens or min(layout.prompt_buckets) < 2:
        raise ValueError("a T5 layout has no verify graphs (verify_tokens=0) and prompt buckets of at least 2 tokens")
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    shape = T5Shape.from_config(config)
    examples = layout.examples()
    signatures = [[list(s.shape) for s in signature_of(ex)] for ex in examples]
    tokenizer = folder / "tokenizer.json"
    eos = shape.eos_token_id if not isinstance(shape.eos_token_id, list) else shape.eos_token_id[0]
    metadata = {"decoder": {
        "layout": layout.to_json(), "vocab_size": shape.vocab_size, "eos_token_id": eos, "name": name,
        "tokenizer_sha": hashlib.sha256(tokenizer.read_bytes()).hexdigest() if tokenizer.exists() else "",
        "encoder_decoder": True,
    }}
    full = resolve_backend(trace_options.get("backend", "auto")) == "neuron"
    func = functools.partial(t5_from_checkpoint, str(folder.resolve()), layout.max_batch, layout.max_cache,
                             max(layout.prompt_buckets), full_state_outputs=full, dtype=dtype)
    return parallel_model_trace(func, examples, tp_degree=tp_degree, inline_weights_to_neff=False,
                                bucket_config=BucketModelConfig(lambda: shape_bucket_kernel(signatures)),
                                metadata=metadata, progress=progress, **trace_options)


__all__ = ["T5ForConditionalGeneration", "T5Shape", "t5_from_checkpoint", "trace_t5"]
