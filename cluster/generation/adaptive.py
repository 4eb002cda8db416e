"""Adaptive speculation: how many proposals a round asks of the draft, from what was measured.

A round over B running rows either decodes one token per row (one target decode forward) or
speculates (the draft proposes k tokens per speculating row in one `decode_loop` call, the target
verifies them in one verify forward). Which pays depends on the batch: at batch 1 a cheap draft
that the target agrees with often wins; in a busy batch the verify forward costs several decode
forwards and the draft's steps are not free, so plain decoding wins. `choose_k` decides per round
from two measurements:

- `CallCosts`: the seconds of each kind of model call (target decode, target verify, one draft
  step) per batch bucket, as moving averages of the calls this batch made;
- each row's acceptance: the chance the target accepts one more proposal, estimated from the row's
  own rounds with the pair's running rate as the prior (`acceptance_estimate`).

With acceptance a, a row asked for k proposals emits (1 - a^(k+1)) / (1 - a) tokens in expectation
(the accepted run plus the target's own token); a round's cost is the verify forward plus the
draft's steps (its pending tokens, then k - 1 more), or one decode forward when k = 0. `choose_k`
returns the k with the most expected tokens per second. Rows that pin k keep it; an unmeasured
kind of call is measured first (`explore`). Pure functions and plain values: no torch, no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

DECODE_CALL = "decode"
VERIFY_CALL = "verify"
DRAFT_STEP = "draft_step"


@dataclass
class CallCosts:
    """Moving averages of call seconds by (kind, batch bucket); `weight` is the newest call's share."""

    weight: float = 0.2
    seconds: dict[tuple[str, int], float] = field(default_factory=dict)

    def observe(self, kind: str, batch: int, seconds: float) -> None:
        key = (kind, batch)
        old = self.seconds.get(key)
        self.seconds[key] = seconds if old is None else old + self.weight * (seconds - old)

    def get(self, kind: str, batch: int) -> float | None:
        return self.seconds.get((kind, batch))


@dataclass(frozen=True)
class SpeculatingRow:
    """One running row that has a draft: its acceptance estimate, the k it pinned (0: the round
    picks, up to `cap`), and how many tokens its draft cache lags behind (fed before proposing)."""

    acceptance: float
    pinned: int
    cap: int
    pending: int = 1


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a row emits in expectation from k proposals at per-token acceptance `acceptance`."""
    if k <= 0:
        return 1.0
    a = min(max(acceptance, 0.0), 1.0)
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


def acceptance_estimate(accepted: int, trials: int, prior: float, prior_weight: float = 8.0) -> float:
    """A row's chance of accepting one more proposal: accepted / trials (trials count the accepted
    proposals and each round's first rejection), shrunk toward `prior` by `prior_weight` pseudo-trials."""
    return (accepted + prior_weight * prior) / (trials + prior_weight)


def round_plan_k(rows: Sequence[SpeculatingRow], k: int) -> list[int]:
    """Each row's proposals when the round offers k to the rows that let it pick."""
    return [row.pinned or min(k, row.cap) for row in rows]


def choose_k(rows: Sequence[SpeculatingRow], plain_rows: int, decode_s: float, verify_s: float,
             draft_step_s: float) -> int:
    """The k offered to the adaptive rows this round (0: plain decoding for them) that maximises
    expected tokens per second over the whole batch. `plain_rows` are running rows without a draft
    (one token either way). Ties go to the smaller k."""
    best_k, best_rate = 0, -1.0
    for k in range(0, max((row.cap for row in rows), default=0) + 1):
        ks = round_plan_k(rows, k)
        tokens = plain_rows + sum(expected_tokens(row.acceptance, rk) for row, rk in zip(rows, ks))
        longest = max(ks, default=0)
        if longest:
            width = max(row.pending for row, rk in zip(rows, ks) if rk)
            cost = verify_s + (width + longest - 1) * draft_step_s
        else:
            cost = decode_s
        rate = tokens / max(cost, 1e-9)
        if rate > best_rate * (1.0 + 1e-9):
            best_k, best_rate = k, rate
    return best_k


def explore(decode_s: float | None, verify_s: float | None, draft_step_s: float | None, cap: int) -> int | None:
    """The k to run when a cost is not yet measured at this batch size (so the round measures it);
    None when all three are known. Speculation (both of its costs) is measured first."""
    if verify_s is None or draft_step_s is None:
        return min(2, cap)
    if decode_s is None:
        return 0
    return None


__all__ = ["CallCosts", "SpeculatingRow", "acceptance_estimate", "choose_k", "expected_tokens", "explore", "round_plan_k"]
