"""Token sampling: logits to a filtered distribution, and draws from it.

Pure functions over torch tensors; no model, no cluster. The decoder calls
`probabilities` on each step's logits and `sample` on the result, with a
generator from `make_generator` so that a seeded request replays exactly. The parameters
(`SamplingParams`) are a value type of cluster.generation.types.

    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=7)
    generator = make_generator(params.seed)
    next_tokens = sample(probabilities(logits[:, -1], params), generator)
"""

from __future__ import annotations

import os

import torch

from cluster.errors import InputError
from cluster.generation.types import MAX_SEED, SamplingParams, _is_int


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with `seed`, or with fresh OS randomness when `seed` is None."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") % MAX_SEED
    elif not _is_int(seed) or not 0 <= seed < MAX_SEED:
        raise InputError(f"seed={seed!r} is invalid: pass None or an integer in [0, 2**63)")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    return generator


def position_generator(seed: int, position: int) -> torch.Generator:
    """The generator of a sequence's round starting at `position`: a function of the two only."""
    return make_generator((seed * 6364136223846793005 + (position + 1) * 1442695040888963407) % 2**63)


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or logits.shape[-1] < 1:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise InputError(f"logits have shape {shape}: pass a tensor [..., vocab] with vocab >= 1")
    if not logits.is_floating_point():
        raise InputError(f"logits have dtype {logits.dtype}: pass floating-point logits")


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Next-token probabilities [..., V] (float32) from logits [..., V] under `params`.

    Greedy: one-hot of the argmax (ties go to the lowest index, as torch.argmax).
    Otherwise softmax(logits / temperature), restricted to the top_k largest (tokens tied
    with the k-th largest are kept too) and then to the nucleus: sorted descending, a token
    is kept while the probability of the tokens before it is below top_p, so the most likely
    token always stays. The kept probabilities are renormalised to sum to 1.
    """
    _check_logits(logits)
    logits = logits.float()
    vocab = logits.shape[-1]
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), vocab).to(torch.float32)

    # Subtract the max before dividing so that a tiny temperature cannot overflow to inf.
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature
    if 0 < params.top_k < vocab:
        kth_largest = torch.topk(scaled, params.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)

    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        keep_sorted = mass_before < params.top_p
        keep_sorted[..., 0] = True  # the most likely token, whatever rounding does
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row: LongTensor [B] drawn from probs [B, V] with `generator`.

    Rows need not be normalised but must be non-negative with a positive sum. The same
    generator state and probabilities always give the same tokens. The draw runs on the
    generator's device; the result comes back on the device of `probs`.
    """
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or probs.shape[-1] < 1:
        shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise InputError(f"probs have shape {shape}: pass a tensor [batch, vocab]")
    if probs.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=probs.device)
    weights = probs.to(device=generator.device, dtype=torch.float32)
    drawn = torch.multinomial(weights, 1, generator=generator).squeeze(-1)
    return drawn.to(probs.device)
