"""Speculative decoding: verify a draft model's proposals against the target model.

`verify_draft` is the lossless rule of Leviathan et al. (2023) and Chen et al. (2023),
as in gpt-fast's `speculative_decode`: the emitted tokens are distributed exactly as if
the target model had sampled them one at a time. Pure tensor math, vectorised over the
batch; rows may accept different numbers of proposals. `SpeculationStats` counts how
well the draft is doing.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import torch

from cluster.errors import InputError


def _check_shapes(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor) -> None:
    shapes = (
        f"draft_tokens {tuple(draft_tokens.shape)}, draft_probs {tuple(draft_probs.shape)}, "
        f"target_probs {tuple(target_probs.shape)}"
    )
    expected = "expected draft_tokens [B, k], draft_probs [B, k, V], target_probs [B, k+1, V] with k >= 1"
    if draft_tokens.dim() != 2 or draft_probs.dim() != 3 or target_probs.dim() != 3:
        raise InputError(f"{shapes}: {expected}")
    batch, k = draft_tokens.shape
    if k < 1:
        raise InputError(f"{shapes}: no proposals to verify; {expected}")
    vocab = target_probs.shape[-1]
    if tuple(draft_probs.shape) != (batch, k, vocab) or tuple(target_probs.shape) != (batch, k + 1, vocab):
        raise InputError(f"{shapes}: {expected}")
    if draft_tokens.is_floating_point() or draft_tokens.is_complex() or draft_tokens.dtype == torch.bool:
        raise InputError(f"draft_tokens have dtype {draft_tokens.dtype}: pass integer token ids")
    if draft_tokens.numel() and (int(draft_tokens.min()) < 0 or int(draft_tokens.max()) >= vocab):
        raise InputError(f"draft_tokens hold ids outside [0, {vocab}): pass ids below the vocabulary size")


def _emit(draft_tokens: torch.Tensor, n_accepted: torch.Tensor, last_token: torch.Tensor) -> torch.Tensor:
    """[B, k+1]: the accepted proposals, then `last_token` at n_accepted, then -1."""
    batch, k = draft_tokens.shape
    positions = torch.arange(k + 1, device=draft_tokens.device).unsqueeze(0)
    padded = torch.cat([draft_tokens.long(), draft_tokens.new_full((batch, 1), -1).long()], dim=1)
    tokens = torch.where(positions < n_accepted.unsqueeze(1), padded, torch.full_like(padded, -1))
    return tokens.scatter(1, n_accepted.unsqueeze(1), last_token.long().unsqueeze(1))


def verify_draft(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator,
    greedy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept a prefix of each row's k proposals and add one token from the target.

    draft_tokens [B, k]: the proposals; draft_probs [B, k, V]: the draft distribution q each
    proposal was drawn from; target_probs [B, k+1, V]: the target distribution p at each
    proposal position and one past the last.

    Returns (tokens [B, k+1], n_accepted [B]): row b emits tokens[b, :n_accepted[b] + 1], the
    accepted proposals followed by a correction (at the first rejection) or a bonus token
    (when all k were accepted); the remaining entries are -1.

    Sampling: proposal i is accepted with probability min(1, p_i(x) / q_i(x)), left to right,
    stopping at the first rejection; the correction there is drawn from max(p_i - q_i, 0)
    renormalised (from p_i when that is all zero); the bonus is drawn from p_k. Uses
    `generator` for a [B, k] uniform draw and one multinomial draw per row, so a given
    generator state always gives the same result.
    Greedy: proposal i is accepted iff it is argmax p_i, and the last token is argmax p at
    that position; `generator` is not used.
    """
    _check_shapes(draft_tokens, draft_probs, target_probs)
    batch, k = draft_tokens.shape
    device = target_probs.device
    draft_tokens = draft_tokens.to(device=device, dtype=torch.long)
    draft_probs = draft_probs.to(device)
    if batch == 0:
        return torch.empty((0, k + 1), dtype=torch.long, device=device), torch.empty(0, dtype=torch.long, device=device)

    if greedy:
        target_choice = target_probs.argmax(dim=-1)  # [B, k+1]
        accepted = draft_tokens == target_choice[:, :k]
        n_accepted = accepted.long().cumprod(dim=1).sum(dim=1)
        # Accepted proposals equal the target's choice there; the last token is its choice at n_accepted.
        last_token = target_choice.gather(1, n_accepted.unsqueeze(1)).squeeze(1)
        return _emit(draft_tokens, n_accepted, last_token), n_accepted

    index = draft_tokens.unsqueeze(-1)
    p_proposed = target_probs[:, :k].gather(2, index).squeeze(-1).float()  # [B, k]
    q_proposed = draft_probs.gather(2, index).squeeze(-1).float()
    uniform = torch.rand((batch, k), generator=generator, device=generator.device).to(device)
    # u < p/q, written without the division: a token the target gives 0 is never accepted.
    accepted = uniform * q_proposed < p_proposed
    n_accepted = accepted.long().cumprod(dim=1).sum(dim=1)  # [B] in 0..k

    # The distribution at each row's stopping position: the residual max(p - q, 0) after a
    # rejection; at position k (all accepted) q is padded with zeros, so the residual is p_k.
    rows = torch.arange(batch, device=device)
    p_stop = target_probs[rows, n_accepted].float()  # [B, V]
    q_padded = torch.cat([draft_probs, draft_probs.new_zeros((batch, 1, draft_probs.shape[-1]))], dim=1)
    q_stop = q_padded[rows, n_accepted].float()
    residual = (p_stop - q_stop).clamp_min(0.0)
    residual_mass = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(residual_mass > 0, residual / residual_mass.clamp_min(1e-30), p_stop)

    last_token = torch.multinomial(residual.to(generator.device), 1, generator=generator).squeeze(1).to(device)
    return _emit(draft_tokens, n_accepted, last_token), n_accepted


@dataclass
class SpeculationStats:
    """Running counts of speculative decoding.

    proposed: draft tokens offered for verification; accepted: those the target accepted;
    steps: verification rounds, counted per row (a round over a batch of B rows is B steps);
    target_only_steps: rounds a row that asked for speculation decoded without it, its draft having
    failed (counted per row, like steps; they are not in the rates).
    """

    proposed: int = 0
    accepted: int = 0
    steps: int = 0
    target_only_steps: int = 0

    def add(self, proposed: int, accepted: int, rows: int = 1) -> None:
        """Record one verification round over `rows` rows, `proposed` and `accepted` summed over them."""
        for name, value in (("proposed", proposed), ("accepted", accepted), ("rows", rows)):
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
                raise InputError(f"{name}={value!r} is invalid: pass an integer >= 0")
        if accepted > proposed:
            raise InputError(f"accepted={accepted} exceeds proposed={proposed}: pass accepted <= proposed")
        self.proposed += int(proposed)
        self.accepted += int(accepted)
        self.steps += int(rows)

    @property
    def acceptance_rate(self) -> float:
        """Accepted over proposed draft tokens; 0 when none were proposed."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per round per row: accepted proposals plus the target's one; 0 before any round."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    @property
    def draft_lost(self) -> bool:
        """Whether the draft failed and the rows went on target-only."""
        return self.target_only_steps > 0

    def merge(self, other: SpeculationStats) -> SpeculationStats:
        """A new SpeculationStats holding the sums of this one and `other`."""
        return SpeculationStats(
            proposed=self.proposed + other.proposed,
            accepted=self.accepted + other.accepted,
            steps=self.steps + other.steps,
            target_only_steps=self.target_only_steps + other.target_only_steps,
        )

    def as_dict(self) -> dict[str, float]:
        """The counts and the derived rates, for metrics and logs."""
        return {
            "proposed": self.proposed,
            "accepted": self.accepted,
            "steps": self.steps,
            "target_only_steps": self.target_only_steps,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
        }
