"""The speculation policy: what each round asks of the draft, from what the batch measured.

`SpeculationPolicy` keeps the measurements (`observe`: the seconds of each kind of model call by
batch bucket; `accepted`: the draft's running acceptance) and makes the decisions a round needs:

- `choose(rows, ...)`: the k offered to the rows that let rounds pick it (0: they decode
  plainly), by the expected tokens per second of each option (`cluster.generation.adaptive.rates`).
  An unmeasured kind of call is measured first (`explore`); speculation that lost at a batch size is
  not measured at a larger one (a verify forward costs more decode forwards the more rows it
  carries); the option not taken is run once more when its rate comes close and that one round,
  a lagging draft's catch-up paid whole, loses at most `RECHECK_BUDGET` of the time since.
- `decode_steps(batch)`: how many decode steps a plain round runs in one call to the ranks
  (multi-step decoding).
- `lags(pending, ...)`: whether a draft cache that lags is caught up by one draft prefill rather
  than by stepping through its missing tokens.

Speculation's calls cost what its draft costs: a fused draft steps on the target's ranks inside the
call that verifies (2-5 ms a step at batch 1 here), a separate one calls its own ranks first (4-13
ms a step, its round trip included), n-gram lookup calls no model. Deciding from a fused draft's
costs, a separate one speculated where it lost (x0.55 of target-only through the library API). So
speculation's calls (`DRAFT_CALLS`), where it paid and the acceptance are kept per draft
(`DraftRecord`, `use_draft`); plain decoding's are the target's alone. A graph's first run, which
loads it on the ranks (0.4-1.1 s here against 10-24 ms after), is not counted as its cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from cluster.generation.adaptive import (DECODE_CALL, DRAFT_PREFILL, DRAFT_STEP, ROUND_OVERHEAD, VERIFY_CALL, CallCosts,
                                         SpeculatingRow, catch_up_s, explore, rates, recheck_due, round_cost)

DRAFT_CALLS = (VERIFY_CALL, DRAFT_STEP, DRAFT_PREFILL)  # the calls of speculation: they cost what its draft costs
PRIOR_ACCEPTANCE = 0.6  # a draft's acceptance before any of its rounds is measured


@dataclass
class DraftRecord:
    """What was measured of speculating with one draft: its calls' costs, whether the last choice
    made from measured costs speculated (by target batch bucket), and its running acceptance."""

    costs: CallCosts = field(default_factory=CallCosts)
    paid: dict[int, bool] = field(default_factory=dict)
    acceptance: float = PRIOR_ACCEPTANCE


class SpeculationPolicy:
    # The option not taken (plain decoding, or speculating) is run once more after at least this many
    # adaptive rounds when its expected rate is within this share of the chosen one (and
    # `recheck_due`): its costs drift with the machine's load, and a stale estimate must not lock the
    # batch into one option.
    RECHECK_ROUNDS = 20
    RECHECK_SHARE = 0.7
    # Multi-step decoding (vLLM's num_scheduler_steps): a plain round runs up to MAX_DECODE_STEPS
    # steps in one call to the target's ranks, as many as fit in MULTI_STEP_S at the measured cost of
    # a step, which bounds how long a request arriving meanwhile waits to join and how far a stream's
    # tokens bunch up. At 40 ms (4-5 steps of the shipped target at TP=2 here) the round trips were
    # 1.0 ms of a 7.9 ms step; at 64 ms (8 steps), 0.7 ms.
    MAX_DECODE_STEPS = 8
    MULTI_STEP_S = 0.064
    # With a streamed row, at most this many: its tokens reach the client a round at a time, so the
    # inter-token latency's p99 is about a round (vLLM's goal: within 2x the time per output token).
    STREAM_STEPS = 2

    def __init__(self) -> None:
        self.costs = CallCosts()  # plain decoding's calls and a round's overhead: the target's alone
        self.drafts: dict[str, DraftRecord] = {}
        self.draft = DraftRecord()  # the record of the draft in use
        self._draft_key = ""
        self._rounds = 0  # adaptive rounds chosen from measured costs
        self._last_taken: dict[tuple[bool, int], int] = {}  # (speculated?, target batch bucket) -> adaptive round
        self._first_runs: set[tuple[str, object, str]] = set()
        self._round: tuple[float, float] | None = None  # (when the last round began, seconds in its model calls)

    # -- measurements -------------------------------------------------------------------------
    def use_draft(self, key: str) -> None:
        """Judge speculation from now on by what was measured of the draft `key` (its own record)."""
        self.draft = self.drafts.setdefault(key, DraftRecord())
        self._draft_key = key

    def observe(self, kind: str, batch: int, seconds: float, graph: object = None) -> None:
        """Count a model call's seconds, by kind and batch bucket. `graph` names the graph it ran
        (for speculation's calls, the draft's): its first run is not counted."""
        if graph is not None:
            first = (kind, graph, self._draft_key if kind in DRAFT_CALLS else "")
            if first not in self._first_runs:
                self._first_runs.add(first)
                return
        self._costs_of(kind).observe(kind, batch, seconds)

    def cost(self, kind: str, batch: int) -> float | None:
        """The measured seconds of a call of this kind at this batch bucket; None: not measured."""
        return self._costs_of(kind).get(kind, batch)

    def accepted(self, accepted: int, k: int) -> int:
        """Count a verified round of one row into the draft's acceptance: `accepted` of k proposals,
        and one rejection unless all were accepted. The row's trials from it."""
        trials = accepted + (1 if accepted < k else 0)
        self.draft.acceptance += 0.05 * (accepted / trials - self.draft.acceptance)
        return trials

    def round_begins(self) -> None:
        """A round starts: what the last one cost outside its model calls is measured, when rounds
        run back to back (a longer gap was idle time)."""
        now = time.perf_counter()
        if self._round is not None and now - self._round[0] < 1.0:
            self.costs.observe(ROUND_OVERHEAD, 0, max(0.0, now - self._round[0] - self._round[1]))
        self._round = (now, 0.0)

    def called(self, seconds: float) -> None:
        """A model call of this round took `seconds`."""
        if self._round is not None:
            self._round = (self._round[0], self._round[1] + seconds)

    # -- decisions ----------------------------------------------------------------------------
    def decode_steps(self, target_batch: int, streamed: bool = False) -> int:
        """Decode steps of a plain round in one call: what fits in MULTI_STEP_S at the measured cost
        of a step (one step first, to measure it), at most STREAM_STEPS when a row is `streamed`."""
        step_s = self.cost(DECODE_CALL, target_batch)
        most = self.STREAM_STEPS if streamed else self.MAX_DECODE_STEPS
        return max(1, min(most, int(self.MULTI_STEP_S / step_s))) if step_s else 1

    def draft_prefill_s(self, draft_batch: int, target_batch: int) -> float | None:
        """A draft prefill's cost: measured, else the target's verify forward as a first guess (a
        forward over a few dozen tokens of the smaller model); None: neither known."""
        measured = self.cost(DRAFT_PREFILL, draft_batch)
        return measured if measured is not None else self.cost(VERIFY_CALL, target_batch)

    def lags(self, pending: int, draft_batch: int, target_batch: int) -> bool:
        """Whether a draft cache `pending` tokens behind is caught up by one draft prefill: when
        stepping through the missing tokens costs more."""
        prefill_s = self.draft_prefill_s(draft_batch, target_batch)
        return prefill_s is not None and catch_up_s(pending, self.cost(DRAFT_STEP, draft_batch) or 0.0) > prefill_s

    def choose(self, rows: Sequence[SpeculatingRow], plain_rows: int, target_batch: int, draft_batch: int,
               decode_steps: int = 1) -> int:
        """The k offered this round to the rows that let rounds pick it (0: they decode plainly).

        rows: every running row with a draft (pinned ones too: they speculate anyway); plain_rows:
        running rows without one; decode_steps: what a plain round would run in one call."""
        decode_s, verify_s = self.cost(DECODE_CALL, target_batch), self.cost(VERIFY_CALL, target_batch)
        step_s = self.cost(DRAFT_STEP, draft_batch)
        k = explore(decode_s, verify_s, step_s, max(row.cap for row in rows if not row.pinned))
        if k and self._lost_below(target_batch):
            k = 0  # not worth measuring: speculation lost at a smaller batch, and it only loses more as batches grow
        if k is None:
            costs = (decode_s, verify_s, step_s, self.costs.get(ROUND_OVERHEAD, 0) or 0.0, decode_steps,
                     self.draft_prefill_s(draft_batch, target_batch))
            by_k = rates(rows, plain_rows, *costs)
            k = max(range(len(by_k)), key=lambda j: (by_k[j], -j))
            other = max(range(1, len(by_k)), key=lambda j: (by_k[j], -j)) if k == 0 else 0
            self._rounds += 1
            since = self._rounds - self._last_taken.get((other > 0, target_batch), 0)
            if (since >= self.RECHECK_ROUNDS and by_k[other] >= self.RECHECK_SHARE * by_k[k]
                    and recheck_due(since, round_cost(rows, plain_rows, k, *costs),
                                    round_cost(rows, plain_rows, other, *costs, catch_up_rounds=1))):
                k = other  # and what it costs is measured afresh: the old samples are as stale as the choice
                for kind, batch in ([(VERIFY_CALL, target_batch), (DRAFT_STEP, draft_batch)] if k
                                    else [(DECODE_CALL, target_batch)]):
                    self._costs_of(kind).forget(kind, batch)
            else:
                self.draft.paid[target_batch] = k > 0
        self._last_taken[(k > 0, target_batch)] = self._rounds
        return k

    def _lost_below(self, target_batch: int) -> bool:
        """Whether the last choice made from measured costs at the nearest smaller batch bucket was to
        decode plainly. A verify forward costs more decode forwards the more rows it carries, so
        speculation that loses at a batch size loses at every larger one (vLLM turns it off above a
        batch size); measuring it there would cost a draft prefill and a verify round for nothing."""
        smaller = [b for b in self.draft.paid if b < target_batch]
        return bool(smaller) and not self.draft.paid[max(smaller)]

    def _costs_of(self, kind: str) -> CallCosts:
        return self.draft.costs if kind in DRAFT_CALLS else self.costs


__all__ = ["DRAFT_CALLS", "PRIOR_ACCEPTANCE", "DraftRecord", "SpeculationPolicy"]
