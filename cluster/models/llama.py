"""A tensor-parallel Llama (grouped KV heads, RoPE, SwiGLU, RMSNorm) with its KV cache on the ranks.

Module names match transformers' LlamaForCausalLM, so its checkpoints (whole or per rank) load
with cluster.parallel_layers.load. The KV cache is a pair of buffers per layer, declared as state
through io_aliases (buffer -> output index): each forward returns the updated caches at those
indices and the rank keeps them; they never travel to the coordinator.

The decode contract every traced graph follows:
    forward(input_ids [B, n], position_ids [B, n], cache_mask [B, L], logit_index [B, m])
      -> (logits [B, m, vocab], k_cache_0[:B], v_cache_0[:B], k_cache_1[:B], ...)
New tokens are written into cache rows [:B] at their positions (the cache outputs are those rows;
the rank copies them into the state); queries attend to cache positions
j < L with cache_mask[b, j] == 1 and j <= their own position; logits come from positions logit_index.
"""

from __future__ import annotations

import json
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


ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequencies as the config's rope_parameters (transformers 5) or rope_scaling (4.x) set them."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise UnsupportedModel(f"rope type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")

    @classmethod
    def from_config(cls, data: dict) -> "RopeScaling":
        rope = dict(data.get("rope_scaling") or {})
        rope.update(data.get("rope_parameters") or {})
        if float(rope.get("partial_rotary_factor", data.get("partial_rotary_factor") or 1.0)) != 1.0:
            raise UnsupportedModel("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
        kind = rope.get("rope_type") or rope.get("type") or "default"
        defaults = cls()
        return cls(rope_type=kind, theta=float(rope.get("rope_theta", data.get("rope_theta") or defaults.theta)),
                   factor=float(rope.get("factor", 1.0)),
                   low_freq_factor=float(rope.get("low_freq_factor", defaults.low_freq_factor)),
                   high_freq_factor=float(rope.get("high_freq_factor", defaults.high_freq_factor)),
                   original_max_position_embeddings=int(rope.get("original_max_position_embeddings",
                                                                 defaults.original_max_position_embeddings)))

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """The inverse frequencies of each rotary pair, scaled as configured (transformers' formulas)."""
        inv = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        if self.rope_type == "linear":
            return inv / self.factor
        if self.rope_type == "llama3":
            low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
            high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv


def _sliding_window(data: dict) -> int | None:
    """The attention window the config sets on any layer (None: full attention everywhere)."""
    window = data.get("sliding_window")
    if not window:
        return None
    if data.get("model_type") == "qwen2" and not data.get("use_sliding_window"):
        return None
    layer_types = data.get("layer_types")
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


@dataclass(frozen=True)
class LlamaShape:
    """The sizes and settings of a Llama-family decoder (Llama, Mistral, Qwen2), from its config."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    explicit_head_dim: int = 0  # 0: hidden_size // num_attention_heads
    qkv_bias: bool = False  # Qwen2; Llama's attention_bias
    o_bias: bool = False  # Llama's attention_bias
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    rope: RopeScaling | None = None  # None: default RoPE with rope_theta
    sliding_window: int | None = None
    max_position_embeddings: int = 0

    @classmethod
    def from_config(cls, config: Any) -> "LlamaShape":
        data = config if isinstance(config, dict) else config.to_dict()
        rope = RopeScaling.from_config(data)
        qwen2 = data.get("model_type") == "qwen2"
        eos = data.get("eos_token_id")  # a list (Llama 3): generation stops at its first id only
        return cls(
            vocab_size=data["vocab_size"], hidden_size=data["hidden_size"], num_hidden_layers=data["num_hidden_layers"],
            num_attention_heads=data["num_attention_heads"],
            num_key_value_heads=data.get("num_key_value_heads") or data["num_attention_heads"],
            intermediate_size=data["intermediate_size"], rms_norm_eps=data.get("rms_norm_eps", 1e-5),
            rope_theta=rope.theta, eos_token_id=(eos[0] if eos else None) if isinstance(eos, list) else eos,
            bos_token_id=data.get("bos_token_id"), explicit_head_dim=int(data.get("head_dim") or 0),
            qkv_bias=qwen2 or bool(data.get("attention_bias")), o_bias=bool(data.get("attention_bias")) and not qwen2,
            mlp_bias=bool(data.get("mlp_bias")), tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            rope=rope, sliding_window=_sliding_window(data),
            max_position_embeddings=int(data.get("max_position_embeddings") or 0),
        )

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "LlamaShape":
        return cls.from_config(json.loads((Path(folder) / "config.json").read_text()))

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_attention_heads

    def inv_freq(self) -> torch.Tensor:
        return (self.rope or RopeScaling(theta=self.rope_theta)).inv_freq(self.head_dim)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, shape: LlamaShape, max_batch: int, max_cache: int) -> None:
        super().__init__()
        tp = parallel_state.get_tensor_model_parallel_size()
        for what, count in (("attention heads", shape.num_attention_heads), ("KV heads", shape.num_key_value_heads)):
            if count % tp:
                raise ShardingError(f"Llama: {count} {what} do not divide by tp_degree {tp}; pick a tp_degree that divides {count}")
        hd = shape.head_dim
        self.heads = shape.num_attention_heads // tp
        self.kv_heads = shape.num_key_value_heads // tp
        self.head_dim = hd
        qkv = dict(bias=shape.qkv_bias, gather_output=False)
        self.q_proj = layers.ColumnParallelLinear(shape.hidden_size, shape.num_attention_heads * hd, **qkv)
        self.k_proj = layers.ColumnParallelLinear(shape.hidden_size, shape.num_key_value_heads * hd, **qkv)
        self.v_proj = layers.ColumnParallelLinear(shape.hidden_size, shape.num_key_value_heads * hd, **qkv)
        self.o_proj = layers.RowParallelLinear(shape.num_attention_heads * hd, shape.hidden_size, bias=shape.o_bias, input_is_parallel=True)
        self.full_cache_outputs = False  # True where state outputs must have the state's shape (Neuron aliasing)
        self.register_buffer("k_cache", torch.zeros(max_batch, self.kv_heads, max_cache, hd), persistent=False)
        self.register_buffer("v_cache", torch.zeros(max_batch, self.kv_heads, max_cache, hd), persistent=False)

    def forward(self, h, position_ids, cache_mask, cos, sin):
        batch, n, _ = h.shape
        q = self.q_proj(h).view(batch, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(batch, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(batch, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        index = position_ids[:, None, :, None].expand(batch, self.kv_heads, n, self.head_dim)
        k_rows = self.k_cache[:batch].scatter(2, index, k)
        v_rows = self.v_cache[:batch].scatter(2, index, v)
        span = cache_mask.shape[1]  # the cache-length bucket: attend to this many positions only
        keys = k_rows[:, :, :span].repeat_interleave(self.heads // self.kv_heads, dim=1)
        values = v_rows[:, :, :span].repeat_interleave(self.heads // self.kv_heads, dim=1)
        scores = (q @ keys.transpose(-1, -2)) * (self.head_dim ** -0.5)
        key_pos = torch.arange(span, device=h.device)
        allowed = (cache_mask[:, None, None, :] > 0) & (key_pos[None, None, None, :] <= position_ids[:, None, :, None])
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ values
        out = self.o_proj(out.transpose(1, 2).reshape(batch, n, self.heads * self.head_dim))
        if not self.full_cache_outputs:  # the batch's rows only: the rank updates those rows of the state
            return out, k_rows, v_rows
        new_k = torch.cat([k_rows, self.k_cache[batch:]], dim=0)
        new_v = torch.cat([v_rows, self.v_cache[batch:]], dim=0)
        return out, new_k, new_v


class LlamaMLP(nn.Module):
    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        bias = shape.mlp_bias
        self.gate_proj = layers.ColumnParallelLinear(shape.hidden_size, shape.intermediate_size, bias=bias, gather_output=False)
        self.up_proj = layers.ColumnParallelLinear(shape.hidden_size, shape.intermediate_size, bias=bias, gather_output=False)
        self.down_proj = layers.RowParallelLinear(shape.intermediate_size, shape.hidden_size, bias=bias, input_is_parallel=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, shape: LlamaShape, max_batch: int, max_cache: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(shape, max_batch, max_cache)
        self.mlp = LlamaMLP(shape)
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)

    def forward(self, h, position_ids, cache_mask, cos, sin):
        attn, k, v = self.self_attn(self.input_layernorm(h), position_ids, cache_mask, cos, sin)
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


class LlamaModel(nn.Module):
    def __init__(self, shape: LlamaShape, max_batch: int, max_cache: int) -> None:
        super().__init__()
        self.embed_tokens = layers.ParallelEmbedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(shape, max_batch, max_cache) for _ in range(shape.num_hidden_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.register_buffer("inv_freq", shape.inv_freq(), persistent=False)


class LlamaForCausalLM(nn.Module):
    """TP Llama for the current rank; `io_aliases()` declares its KV cache as state."""

    def __init__(self, shape: LlamaShape, max_batch: int = 4, max_cache: int = 512) -> None:
        super().__init__()
        self.shape = shape
        self.max_batch = max_batch
        self.max_cache = max_cache
        self.model = LlamaModel(shape, max_batch, max_cache)
        self.lm_head = layers.ColumnParallelLinear(shape.hidden_size, shape.vocab_size, bias=False, gather_output=True)

    def forward(self, input_ids, position_ids, cache_mask, logit_index):
        h = self.model.embed_tokens(input_ids)
        freqs = position_ids[..., None].float() * self.model.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, n, head_dim]
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        caches = []
        for layer in self.model.layers:
            h, k, v = layer(h, position_ids, cache_mask, cos, sin)
            caches += [k, v]
        h = self.model.norm(h)
        picked = h.gather(1, logit_index[..., None].expand(-1, -1, h.shape[-1]))
        return (self.lm_head(picked), *caches)

    def io_aliases(self) -> dict[torch.Tensor, int]:
        aliases = {}
        for i, layer in enumerate(self.model.layers):
            aliases[layer.self_attn.k_cache] = 1 + 2 * i
            aliases[layer.self_attn.v_cache] = 2 + 2 * i
        return aliases


def llama_state_dict(folder: str | os.PathLike, shape: LlamaShape) -> dict[str, torch.Tensor]:
    """The whole weights of a transformers decoder folder (single, sharded, safetensors or .bin),
    with lm_head.weight taken from the embeddings where the config ties them and the file omits it."""
    from cluster.models.hf_weights import read_weights

    state = read_weights(folder)
    return tie_lm_head(state, shape)


def tie_lm_head(state: dict, shape: LlamaShape) -> dict:
    """`state` (tensors or shapes) with lm_head.weight = the token embeddings when the config ties them."""
    embed = "model.embed_tokens.weight"
    if shape.tie_word_embeddings and "lm_head.weight" not in state and embed in state:
        return {**state, "lm_head.weight": state[embed]}
    return state


def llama_from_checkpoint(folder: str | os.PathLike, max_batch: int = 4, max_cache: int = 512,
                          sharded: bool = False, checkpoint: str | os.PathLike | None = None,
                          full_cache_outputs: bool = False, dtype: str | None = None) -> tuple[nn.Module, dict]:
    """(model, io_aliases) for this rank from a transformers Llama, Mistral or Qwen2 folder (config.json +
    weights: one file or an index of shards), or from `checkpoint` (a file, or with `sharded` a folder of
    tp_rank_XX files).

    The cache outputs are the batch bucket's rows only, unless `full_cache_outputs` (the whole
    cache, for backends whose aliasing needs the state's shape). `dtype` ("bfloat16", ...) casts the
    weights and the cache; default float32."""
    from cluster.models.hf_weights import assign_whole, materialize, parameters_on_meta
    from cluster.parallel_layers import load

    folder = Path(folder)
    shape = LlamaShape.from_folder(folder)
    # the parameters are made in the weights' dtype with no initial values: the checkpoint fills them
    # (a float32 model cast afterwards would hold 3x a bf16 shard at its peak)
    with parameters_on_meta():
        model = LlamaForCausalLM(shape, max_batch, max_cache).eval()
    materialize(model, getattr(torch, dtype) if dtype is not None else torch.float32)
    for layer in model.model.layers:
        layer.self_attn.full_cache_outputs = full_cache_outputs
    if checkpoint is not None or sharded:
        load(checkpoint if checkpoint is not None else folder, model, sharded=sharded)
    else:
        assign_whole(model, llama_state_dict(folder, shape), str(folder), parallel_state.get_tensor_model_parallel_rank(),
                     parallel_state.get_tensor_model_parallel_size())
    if dtype is not None:
        inv_freq = model.model.inv_freq
        model = model.to(getattr(torch, dtype))
        model.model.inv_freq = inv_freq  # positions are rotated in float32 whatever the weights' dtype
    return model, model.io_aliases()


def trace_llama(folder: str | os.PathLike, tp_degree: int = 2, layout: Any = None, name: str = "llama",
                progress: bool | None = None, dtype: str | None = None, **trace_options: Any) -> Any:
    """Trace a transformers Llama folder for generation: every graph of `layout` (a DecoderLayout),
    weights separated (the graphs share one copy and the KV cache is state on the ranks)."""
    import functools
    import hashlib

    from cluster.buckets import shape_bucket_kernel
    from cluster.generation.layout import DecoderLayout
    from cluster.signature import signature_of
    from cluster.trace import BucketModelConfig, parallel_model_trace

    layout = layout or DecoderLayout()
    folder = Path(folder)
    shape = LlamaShape.from_folder(folder)
    examples = layout.examples()
    signatures = [[list(s.shape) for s in signature_of(ex)] for ex in examples]
    tokenizer = folder / "tokenizer.json"
    if not tokenizer.exists():
        tokenizer = folder.parent / "tokenizer.json"
    metadata = {"decoder": {
        "layout": layout.to_json(), "vocab_size": shape.vocab_size, "eos_token_id": shape.eos_token_id, "name": name,
        "tokenizer_sha": hashlib.sha256(tokenizer.read_bytes()).hexdigest() if tokenizer.exists() else "",
    }}
    from cluster.trace.backends import resolve_backend

    full = resolve_backend(trace_options.get("backend", "auto")) == "neuron"  # Neuron aliases whole tensors
    func = functools.partial(llama_from_checkpoint, str(folder.resolve()), layout.max_batch, layout.max_cache,
                             full_cache_outputs=full, dtype=dtype)
    return parallel_model_trace(func, examples, tp_degree=tp_degree, inline_weights_to_neff=False,
                                bucket_config=BucketModelConfig(lambda: shape_bucket_kernel(signatures)),
                                metadata=metadata, progress=progress, **trace_options)
