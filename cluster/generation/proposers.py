"""Where a speculating round's proposals come from: one interface, three proposers.

- `SeparateDraft`: a draft loaded as its own model; its calls go to its own ranks, and their
  failure is the draft's (`DraftUnavailable`: the batch goes on target-only), not the target's.
- `FusedDraft`: a draft fused into the target (cluster.trace.fused): every target rank holds a
  whole copy, so the proposals and the target's verify forward are one call (`FusedRound`), and a
  failure is the target's.
- `NgramProposer`: no draft model: each row's proposals are the tokens that followed the last
  earlier occurrence of its latest n-gram (cluster.generation.ngram); a row with no match proposes
  nothing that round, so a round where none has any is a plain one.

A model draft's cache mirrors the target's slots. A row that lets rounds pick k is not prefilled
on the draft at admission: the first round that has it speculate catches its draft up with one
draft prefill (`lagging`; also for a draft that lags by more than stepping through costs), so a
busy batch that never speculates never pays for its draft. Every call is timed into the
speculation policy (cluster.generation.policy), which judges each draft on its own calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from cluster.errors import ClusterError, DraftUnavailable, InputError, Overloaded
from cluster.generation.adaptive import DRAFT_PREFILL, DRAFT_STEP, VERIFY_CALL
from cluster.generation.layout import prefill_inputs
from cluster.generation.ngram import NgramIndex
from cluster.generation.plan import DraftPlan, Forward, FusedRound, RoundPlan, draft_tokens_kept
from cluster.generation.types import SamplingParams

if TYPE_CHECKING:
    from cluster.generation.endpoint import DecoderEndpoint
    from cluster.generation.plan import Call
    from cluster.generation.policy import SpeculationPolicy
    from cluster.generation.sequence import LiveSequence


@dataclass
class Proposals:
    """A round's proposals by slot [B, k_max]; the draft's probabilities [B, k_max, V] when a row
    samples (None: greedy rows only, or no draft model); the target's verify logits when the
    proposer ran the verify forward itself (a fused round), else None."""

    tokens: torch.Tensor
    q: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class Proposer:
    """One source of proposals for a batch's speculating rows (see the module docstring)."""

    fused = False
    ngram = False

    def __init__(self, endpoint: DecoderEndpoint, target: DecoderEndpoint, policy: SpeculationPolicy) -> None:
        self.endpoint, self.target, self.policy = endpoint, target, policy

    def can_propose(self, row: LiveSequence) -> bool:
        """Whether the row may speculate this round."""
        return True

    def before_plan(self, rows: list[LiveSequence]) -> set[int]:
        """Called once the round's k per row is chosen, before it is planned: the slots whose draft
        cache the round's catch-up prefill refills first. A proposer may lower a row's round_k."""
        return set()

    def catch_up(self, plan: RoundPlan) -> None:
        """Refill the draft caches of `plan.catch_up` (raises DraftUnavailable)."""

    def prefill(self, plan: RoundPlan) -> None:
        """Prefill the draft for the new rows that pin k (`plan.draft_prompts`)."""

    def propose(self, plan: RoundPlan, rows: list[LiveSequence]) -> Proposals:
        raise NotImplementedError

    def kept(self, plan: RoundPlan, row: LiveSequence, accepted: int) -> int:
        """How many tokens the row's draft cache gains in a round where `accepted` were accepted."""
        return draft_tokens_kept(plan.draft.tokens[row.slot], accepted, plan.k_max)

    def after_round(self, rows: list[LiveSequence]) -> None:
        """Called after every round."""

    def pins_every_position(self, rows: list[LiveSequence]) -> bool:
        """Whether plain rounds must run one step at a time (a row looks for proposals at every position)."""
        return False

    def _timed(self, run: Callable[[Call], Any], call: Call) -> tuple[Any, float]:
        """`run(call)` and its seconds, counted into the round's model-call time."""
        started = time.perf_counter()
        out = run(call)
        elapsed = time.perf_counter() - started
        self.policy.called(elapsed)
        return out, elapsed


class SeparateDraft(Proposer):
    """A draft loaded as its own model: a `DraftPlan` call to its ranks, then the target's verify."""

    def can_propose(self, row: LiveSequence) -> bool:
        # a row whose draft was never prefilled and whose sequence no longer fits the draft's largest
        # prompt bucket decodes plainly: catching it up token by token would cost more than speculation wins
        return bool(row.draft_cached) or self._prefillable(row)

    def before_plan(self, rows: list[LiveSequence]) -> set[int]:
        speculating = [row for row in rows if row.round_k and not row.finish]
        if not speculating:
            return set()
        batch = self.endpoint.layout.batch_bucket(max(row.slot for row in speculating) + 1)
        target_batch = self.target.layout.batch_bucket(batch)
        return {row.slot for row in speculating if self._prefillable(row) and (
            not row.draft_cached or self.policy.lags(len(row.sequence) - row.draft_cached, batch, target_batch))}

    def catch_up(self, plan: RoundPlan) -> None:
        bucket, inputs = prefill_inputs(self.endpoint.layout, list(plan.catch_up))
        elapsed = self._call(Forward(bucket, inputs))[1]
        self.policy.observe(DRAFT_PREFILL, self.endpoint.layout.batch_bucket(len(plan.catch_up)), elapsed, graph=bucket)

    def prefill(self, plan: RoundPlan) -> None:
        if plan.draft_prompts:
            self._call(Forward(*prefill_inputs(self.endpoint.layout, list(plan.draft_prompts))))

    def propose(self, plan: RoundPlan, rows: list[LiveSequence]) -> Proposals:
        batch = self.endpoint.layout.batch_bucket(plan.draft.width)
        (tokens, q), elapsed = self._call(self._draft_plan(plan, rows))
        self.policy.observe(DRAFT_STEP, batch, elapsed / self._steps(plan), graph=batch)
        return Proposals(tokens, q)

    def _draft_plan(self, plan: RoundPlan, rows: list[LiveSequence]) -> DraftPlan:
        """The draft's call: k_max proposals per speculating row, each sampled as its row samples."""
        drafted = [row for row in rows if row.round_k]
        sampling, seeds = [SamplingParams()] * plan.draft.width, [0] * plan.draft.width
        for row in drafted:
            sampling[row.slot], seeds[row.slot] = row.request.sampling, row.draft_seed()
        return DraftPlan(plan.draft.tokens, plan.draft.starts, plan.k_max, self.endpoint.layout, tuple(sampling),
                         tuple(seeds), want_probs=any(not row.request.sampling.greedy for row in drafted))

    @staticmethod
    def _steps(plan: RoundPlan) -> int:
        """The draft's decode steps in the round: its pending tokens and all proposals but the last."""
        return len(plan.draft.tokens[0]) + plan.k_max - 1

    def _prefillable(self, row: LiveSequence) -> bool:
        """Whether a draft prefill can take the row's sequence (all of it but the last token)."""
        return len(row.sequence) - 1 <= max(self.endpoint.layout.prompt_buckets)

    def _call(self, call: Call) -> tuple[Any, float]:
        """A call to the draft's ranks and its seconds; its failure is the draft's, not the target's."""
        try:
            return self._timed(self.endpoint.run, call)
        except (InputError, Overloaded):
            raise
        except ClusterError as exc:
            raise DraftUnavailable(f"draft model {self.endpoint.name!r} failed: {str(exc).splitlines()[0]}; "
                                   "retry, or generate without a draft") from exc


class FusedDraft(SeparateDraft):
    """A draft fused into the target: proposals and verify in one `FusedRound` call to the target's
    ranks; its prefills run on the draft's graphs there. Its failure is the target's."""

    fused = True

    def propose(self, plan: RoundPlan, rows: list[LiveSequence]) -> Proposals:
        ks = [0] * len(plan.target.tokens)
        for row in rows:
            ks[row.slot] = row.round_k
        call = FusedRound(self._draft_plan(plan, rows), plan.target.tokens, plan.target.starts, tuple(ks), self.target.layout)
        (tokens, q, logits, draft_s), elapsed = self._timed(self.target.run, call)
        draft_batch, target_batch = self.endpoint.layout.batch_bucket(plan.draft.width), self.target.layout.batch_bucket(plan.target.width)
        self.policy.observe(DRAFT_STEP, draft_batch, draft_s / self._steps(plan), graph=draft_batch)
        self.policy.observe(VERIFY_CALL, target_batch, max(0.0, elapsed - draft_s), graph=target_batch)
        return Proposals(tokens, q, logits.float())

    def _call(self, call: Call) -> tuple[Any, float]:
        return self._timed(self.endpoint.run, call)  # the target's ranks: their failure is the target's


class NgramProposer(Proposer):
    """Proposals by n-gram lookup in each row's own tokens: no draft model, no draft cache."""

    ngram = True

    def __init__(self, endpoint: DecoderEndpoint, target: DecoderEndpoint, policy: SpeculationPolicy) -> None:
        super().__init__(endpoint, target, policy)
        self._found: torch.Tensor | None = None

    def before_plan(self, rows: list[LiveSequence]) -> set[int]:
        """Look up each speculating row's proposals, up to its round's k; a row without a match
        proposes none this round (its round_k drops to 0)."""
        self._found = None
        drafted = [row for row in rows if row.round_k and not row.finish]
        if not drafted:
            return set()
        started = time.perf_counter()
        found = {}
        for row in drafted:
            row.ngrams = row.ngrams or NgramIndex()
            found[row.slot] = row.ngrams.propose(row.sequence, row.round_k)
            row.round_k = len(found[row.slot])
        steps = max(map(len, found.values()), default=0)
        self.policy.observe(DRAFT_STEP, self.endpoint.layout.batch_bucket(max(found) + 1),
                            (time.perf_counter() - started) / max(1, steps))
        if steps:
            self._found = torch.zeros(max(found) + 1, steps, dtype=torch.int64)
            for slot, tokens in found.items():
                self._found[slot, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        return set()

    def propose(self, plan: RoundPlan, rows: list[LiveSequence]) -> Proposals:
        return Proposals(self._found)

    def kept(self, plan: RoundPlan, row: LiveSequence, accepted: int) -> int:
        return 1 + accepted

    def after_round(self, rows: list[LiveSequence]) -> None:
        for row in rows:  # no draft cache to keep: it is as long as the target's
            row.draft_cached = row.cached

    def pins_every_position(self, rows: list[LiveSequence]) -> bool:
        return any(row.k and not row.adaptive and not row.finish for row in rows)


def proposer_for(draft: DecoderEndpoint, target: DecoderEndpoint, policy: SpeculationPolicy) -> Proposer:
    """The proposer of a draft endpoint."""
    kind = NgramProposer if draft.ngram else FusedDraft if draft.fused else SeparateDraft
    return kind(draft, target, policy)


__all__ = ["FusedDraft", "NgramProposer", "Proposals", "Proposer", "SeparateDraft", "proposer_for"]
