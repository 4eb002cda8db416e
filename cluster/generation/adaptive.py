"""Adaptive speculation: how many proposals a round asks of the draft, from what was measured.

A round over B running rows either decodes one token per row (one target decode forward) or
speculates (the draft proposes k tokens per speculating row in one `DraftPlan` call, the target
verifies them in one verify forward). Which pays depends on the batch: at batch 1 a cheap draft
that the target agrees with often wins; in a busy batch the verify forward costs several decode
forwards and the draft's steps are not free, so plain decoding wins. `choose_k` decides per round
from two measurements:

- `CallCosts`: the seconds of each kind of model call (target decode, target verify, one draft
  step) per batch bucket: the median of the last few calls of that kind, so one call slowed by
  the machine does not swing the choice;
- each row's acceptance: the chance the target accepts one more proposal, estimated from the row's
  own rounds with the pair's running rate as the prior (`acceptance_estimate`).

With acceptance a, a row asked for k proposals emits (1 - a^(k+1)) / (1 - a) tokens in expectation
(the accepted run plus the target's own token); a round's cost is the verify forward plus the
draft's k steps, or one decode forward per token when k = 0 (a plain round runs several decode
steps in one call, multi-step decoding, so it pays the round's overhead once for all of them). A
row whose draft cache lags (it decoded plainly for a while, or its draft was never prefilled)
first catches up: it feeds the draft its missing tokens one step each, or, when that costs more, a
draft prefill over its whole sequence; the catch-up is paid once for the rounds that follow, so it
counts 1/`CATCH_UP_ROUNDS` of its cost. `choose_k` returns the k with
the most expected tokens per second (`rates` gives them all). Rows that pin k keep it; an
unmeasured kind of call is measured first (`explore`), and the engine re-measures the option it
has not taken for a while when that option's rate is close and that one round, a lagging draft's
catch-up paid whole, loses at most `RECHECK_BUDGET` of the time since (`recheck_due`). Pure
functions and plain values: no torch, no model.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

DECODE_CALL = "decode"
VERIFY_CALL = "verify"
DRAFT_STEP = "draft_step"
DRAFT_PREFILL = "draft_prefill"  # a draft prefill over rows' whole sequences: a lagging draft's catch-up
ROUND_OVERHEAD = "round_overhead"  # a round's time outside its model calls (planning, sampling, handing tokens over)
CATCH_UP_ROUNDS = 8  # rounds a lagging draft's catch-up is spread over
RECHECK_BUDGET = 0.03  # the share of a batch's time that re-running the option not taken may lose


@dataclass
class CallCosts:
    """Call seconds by (kind, batch bucket): the median of the last `window` calls of each."""

    window: int = 9
    samples: dict[tuple[str, int], deque] = field(default_factory=dict)

    def observe(self, kind: str, batch: int, seconds: float) -> None:
        self.samples.setdefault((kind, batch), deque(maxlen=self.window)).append(seconds)

    def forget(self, kind: str, batch: int) -> None:
        """Drop what was measured of this kind at this batch size (the next call measures it afresh)."""
        self.samples.pop((kind, batch), None)

    def set(self, kind: str, batch: int, seconds: float) -> None:
        """Forget what was measured of this kind at this batch size: it costs `seconds` now."""
        self.samples[(kind, batch)] = deque([seconds], maxlen=self.window)

    def get(self, kind: str, batch: int) -> float | None:
        recent = self.samples.get((kind, batch))
        return statistics.median(recent) if recent else None


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


def catch_up_s(pending: int, draft_step_s: float, draft_prefill_s: float | None = None) -> float:
    """What bringing a draft cache `pending` tokens behind up to date costs before a round can
    propose: its missing tokens but the last (which the round feeds) one step each, or one draft
    prefill over the whole sequence when that is known and cheaper."""
    stepped = max(0, pending - 1) * draft_step_s
    return stepped if draft_prefill_s is None else min(stepped, draft_prefill_s)


def round_cost(rows: Sequence[SpeculatingRow], plain_rows: int, k: int, decode_s: float, verify_s: float,
               draft_step_s: float, overhead_s: float = 0.0, decode_steps: int = 1,
               draft_prefill_s: float | None = None, catch_up_rounds: int = CATCH_UP_ROUNDS) -> tuple[float, float]:
    """(expected tokens, seconds) of one round that offers the adaptive rows k (see `rates`); a
    lagging draft's catch-up counts 1/`catch_up_rounds` of its cost (1: all of it, as the round that
    pays it does)."""
    ks = round_plan_k(rows, k)
    tokens = plain_rows + sum(expected_tokens(row.acceptance, rk) for row, rk in zip(rows, ks))
    longest = max(ks, default=0)
    if not longest:
        steps = max(1, decode_steps)
        return tokens * steps, steps * decode_s + overhead_s
    catch_up = max(catch_up_s(row.pending, draft_step_s, draft_prefill_s) for row, rk in zip(rows, ks) if rk)
    return tokens, verify_s + longest * draft_step_s + catch_up / catch_up_rounds + overhead_s


def rates(rows: Sequence[SpeculatingRow], plain_rows: int, decode_s: float, verify_s: float,
          draft_step_s: float, overhead_s: float = 0.0, decode_steps: int = 1,
          draft_prefill_s: float | None = None) -> list[float]:
    """Expected tokens per second of the whole batch when the adaptive rows are offered k = 0, 1, ...
    up to the largest cap. `plain_rows` are running rows without a draft (one token either way);
    `overhead_s` is what every round costs besides its model calls; a plain round runs
    `decode_steps` decode steps (multi-step decoding) for that overhead. `draft_prefill_s` is a
    draft prefill's cost (a lagging row's catch-up when cheaper than stepping; `catch_up_s`)."""
    out = []
    for k in range(0, max((row.cap for row in rows), default=0) + 1):
        tokens, seconds = round_cost(rows, plain_rows, k, decode_s, verify_s, draft_step_s, overhead_s, decode_steps,
                                     draft_prefill_s)
        out.append(tokens / max(seconds, 1e-9))
    return out


def choose_k(rows: Sequence[SpeculatingRow], plain_rows: int, decode_s: float, verify_s: float,
             draft_step_s: float, overhead_s: float = 0.0, decode_steps: int = 1,
             draft_prefill_s: float | None = None) -> int:
    """The k offered to the adaptive rows this round (0: plain decoding for them) that maximises
    expected tokens per second over the whole batch (see `rates`). Ties go to the smaller k."""
    by_k = rates(rows, plain_rows, decode_s, verify_s, draft_step_s, overhead_s, decode_steps, draft_prefill_s)
    best = max(by_k)
    return next(k for k, rate in enumerate(by_k) if rate >= best * (1.0 - 1e-9))


def recheck_due(rounds_since: int, chosen: tuple[float, float], other: tuple[float, float],
                budget: float = RECHECK_BUDGET) -> bool:
    """Whether the option not taken may run once more, to be measured afresh, `rounds_since` rounds
    after it last ran: when what that one round loses against the chosen option is at most `budget`
    of those rounds' time. `chosen` and `other` are their (tokens, seconds) from `round_cost`, the
    other's with a lagging draft's catch-up whole (the round that re-measures speculation pays it).
    A separate draft's catch-up after plain rounds is a draft prefill, 40-165 ms at batch 1 here
    against 50-65 ms for a plain round of 4-5 tokens; re-measured every few rounds whatever it cost,
    it took a share of the batch's time however far behind speculation was."""
    tokens, seconds = chosen
    other_tokens, other_seconds = other
    lost = other_seconds - other_tokens * seconds / max(tokens, 1e-9)
    return lost <= budget * rounds_since * seconds


def explore(decode_s: float | None, verify_s: float | None, draft_step_s: float | None, cap: int) -> int | None:
    """The k to run when a cost is not yet measured at this batch size (so the round measures it);
    None when all three are known. Speculation (both of its costs) is measured first."""
    if verify_s is None or draft_step_s is None:
        return min(2, cap)
    if decode_s is None:
        return 0
    return None


__all__ = ["CATCH_UP_ROUNDS", "DRAFT_PREFILL", "RECHECK_BUDGET", "ROUND_OVERHEAD", "CallCosts", "SpeculatingRow",
           "acceptance_estimate", "catch_up_s", "choose_k", "expected_tokens", "explore", "rates", "recheck_due", "round_cost",
           "round_plan_k"]
