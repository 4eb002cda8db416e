"""The generation loop: continuous batching over a decoder's KV-cache slots, with optional speculation.

A decoder's KV cache has `max_batch` rows; each row is a slot that one sequence holds from the
moment it is admitted until its session is closed. `DecodeBatch.step()` runs one round in three
parts: plan (`cluster.generation.plan.plan_round`, pure, from the sequences' state), execute
(the calls to the models' ranks) and update (the sequences take the results: tokens, cache
lengths, counts). Sequences admitted since the last round are prefilled together (the other
rows' tokens go to the scratch slot, so their caches are untouched); the running ones decode one
token or, when some of them speculate, run one draft/verify round. A new request therefore joins
at the next round and a finished one leaves without waiting for the others: continuous batching.

The sequences (`LiveSequence`, cluster.generation.sequence) keep their own sampling parameters
and random generator, so what a seeded request
generates does not depend on what else shares the batch. The generator is drawn afresh each
round from the sequence's seed and its length (`position_generator`), so a sequence carried on
elsewhere (`GenerationRequest.resumed`: another replica prefills the prompt plus what was already
generated) continues the same random stream. A round is one round trip per model: the
draft proposes k tokens in one call on its ranks (`DraftPlan`), the target verifies them in one
`verify` forward. Rolling back rejected tokens is free, because what a query may attend to is
decided by the lengths kept here, not by the cache contents.

A round reads: the speculation policy (`SpeculationPolicy.choose`, cluster.generation.policy)
and the proposer (cluster.generation.proposers: a separate draft, a fused one, or n-gram lookup)
decide each row's k and which draft caches to catch up; `plan_round` says the whole round; the
round runs; the sequences take its results. A request that leaves speculation_length at 0 lets
each round choose its k from the calls the batch timed and the proposals its rows had accepted
(k = 0: those rows decode plainly, their draft cache catching up when they speculate again); a
request that pins k keeps it. Greedy output is the target's whatever k each round takes;
sampled output is an exact sample of the target either way, but only a pinned k makes a seeded
request's tokens independent of the rounds' choices.

A draft that fails (its ranks lost, a call timed out) costs no sequence: the round it failed in
goes on target-only, every sequence that speculated decodes target-only from then on (its
`SpeculationStats.target_only_steps` counts those rounds), and the batch forgets the draft. The
target's cache is untouched by a failed draft call, so greedy output is what it would have been.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import torch

from cluster.errors import ClusterError, DraftUnavailable, Overloaded
from cluster.generation.adaptive import DECODE_CALL, VERIFY_CALL, SpeculatingRow, acceptance_estimate
from cluster.generation.endpoint import DecoderEndpoint
from cluster.generation.layout import prefill_inputs, step_inputs
from cluster.generation.plan import DECODE, VERIFY, CopyRows, DecodeSteps, Forward, RoundPlan, plan_round
from cluster.generation.policy import SpeculationPolicy
from cluster.generation.prefix import PrefixCache
from cluster.generation.proposers import Proposer, proposer_for
from cluster.generation.sampling import make_generator, probabilities
from cluster.generation.sequence import LiveSequence, stop_matched, validate
from cluster.generation.speculative import SpeculationStats, verify_draft
from cluster.generation.types import GenerationRequest, SamplingParams, SessionSummary, StepResult

log = logging.getLogger("tpcluster.generation")


class DecodeBatch:
    """The sequences sharing one decoder's KV cache, one slot (cache row) each.

    `open` admits a request's prompts (one sequence each) and returns a session id; `step` advances
    every live sequence; `take` hands a session the tokens generated since its last take; `close`
    frees its slots. A session belongs to whoever opened it, who closes it. One draft at a time
    (`proposer`) serves the batch's speculating sequences: a model draft's cache rows mirror the
    target's slots. `policy` holds what was measured and decides each round's k.
    """

    def __init__(self, target: DecoderEndpoint) -> None:
        self.target = target
        self.proposer: Proposer | None = None
        self.policy = SpeculationPolicy()
        self.slots: dict[int, LiveSequence] = {}
        self.sessions: dict[int, list[LiveSequence]] = {}
        self._last_session = 0
        # prefix reuse: finished rows' caches kept, a prompt's held prefix taken over; the rest is
        # prefilled through extend graphs, so only a model traced with them reuses
        self.prefixes = PrefixCache() if target.layout.chunk_tokens else None

    @property
    def draft(self) -> DecoderEndpoint | None:
        """The endpoint of the batch's draft; None: no sequence speculates."""
        return self.proposer.endpoint if self.proposer is not None else None

    def _use_draft(self, draft: DecoderEndpoint) -> None:
        if self.proposer is None or self.proposer.endpoint.key != draft.key:
            self.proposer = proposer_for(draft, self.target, self.policy)
        self.policy.use_draft(draft.key)

    # -- sessions ---------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.target.layout.max_batch

    @property
    def free_slots(self) -> int:
        return self.capacity - len(self.slots)

    def has_work(self) -> bool:
        return any(not s.finish for s in self.slots.values())

    def open(self, request: GenerationRequest, draft: DecoderEndpoint | None = None) -> int:
        """Admit the request's prompts, one free slot each; they are prefilled at the next step."""
        k, adaptive = validate(request, self.target, draft)
        if draft is not None and self.draft is not None and self.draft.key != draft.key and self._speculating():
            raise Overloaded(f"{self.target.name!r} is speculating with another draft replica; retry shortly")
        limit = self.capacity if draft is None else min(self.capacity, draft.layout.max_batch)
        # what each prefill feeds (a resumed prompt's last token is fed by its first round): a reused prefix leaves some of it
        placed = self._place([p[:-1] if request.resumed else p for p in request.prompts], limit)
        if placed is None:
            raise Overloaded(f"all {self.capacity} sequence slots of {self.target.name!r} are generating; retry shortly")
        if draft is not None:
            self._use_draft(draft)
        self._last_session += 1
        session = self._last_session
        generator = make_generator(request.sampling.seed)
        members = []
        for (slot, reused), prompt in zip(placed, request.prompts):
            row_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            member = LiveSequence(slot, session, list(prompt), len(prompt) - request.resumed, request, k, row_seed, adaptive)
            member.cached = member.reused = reused  # the prompt's first tokens already in its row: it prefills the rest
            self.slots[slot] = member
            members.append(member)
        self.sessions[session] = members
        return session

    def _speculating(self) -> bool:
        return any(s.k for s in self.slots.values())

    def _place(self, prompts: Sequence[Sequence[int]], limit: int) -> list[tuple[int, int]] | None:
        """(slot, tokens reused) for each prompt, None when the slots are full: with prefix reuse, a
        slot whose row holds the prompt's longest whole-block prefix (copied on the ranks from the
        row that holds it when that row is not free: one call, before any prefill)."""
        if self.prefixes is None:
            free = [slot for slot in range(limit) if slot not in self.slots][: len(prompts)]
            return [(slot, 0) for slot in free] if len(free) == len(prompts) else None
        placed = self.prefixes.place(prompts, self.slots, limit)
        if placed is None:
            return None
        if placed[1]:
            self.target.run(CopyRows(tuple(placed[1])))
        return [(p.slot, p.reused) for p in placed[0]]

    def close(self, session: int) -> SessionSummary | None:
        """Free the session's slots; its summary, or None when it is not open."""
        members = self.sessions.pop(session, None)
        if members is None:
            return None
        stats = SpeculationStats()
        for member in members:
            del self.slots[member.slot]
            stats = stats.merge(member.stats)
            if self.prefixes is not None:
                self.prefixes.keep(member.slot, member.sequence[: member.cached])
        if not self._speculating():
            self.proposer = None
        return SessionSummary([m.sequence for m in members], [m.prompt_length for m in members],
                              [m.finish for m in members], stats, sum(m.reused for m in members))

    def take(self, session: int) -> StepResult:
        """The session's tokens per row since its last take."""
        members = self.sessions.get(session)
        if members is None:
            raise ClusterError(f"generation {session} is not open on this model (closed, or the replica was rebuilt)")
        tokens = []
        for member in members:
            tokens.append(member.outbox)
            member.outbox = []
        return StepResult(tokens, all(m.finish for m in members), [m.finish for m in members])

    def has_output(self, session: int) -> bool:
        return any(m.outbox for m in self.sessions.get(session, ()))

    def finished(self, session: int) -> bool:
        return all(m.finish for m in self.sessions.get(session, ()))

    # -- rounds: decide, plan, execute, update ---------------------------------------------------
    def step(self) -> None:
        """One round for every live sequence; new tokens go to each sequence's outbox."""
        self.policy.round_begins()
        rows = list(self.slots.values())
        for row in rows:
            row.new_round()
        steps = self._choose_round_k(rows)
        catch_up = self.proposer.before_plan(rows) if self.proposer is not None else set()
        layout = self.target.layout
        plan = plan_round([row.state(row.slot in catch_up, layout) for row in rows], steps, layout.chunk_tokens)
        if plan.step == VERIFY:
            self._speculative_round(plan)
        elif plan.step == DECODE:
            if plan.decode_steps > 1:
                self._multi_step_round(plan)
            else:
                self._decode_round(plan)
        if plan.prefill:
            self._prefill_round(plan)
        if plan.chunks is not None:
            self._chunk_round(plan)
        if self.proposer is not None:
            self.proposer.after_round(list(self.slots.values()))

    def _choose_round_k(self, rows: list[LiveSequence]) -> int:
        """Set each running row's proposals for this round (a pinned k as asked, an adaptive one from
        the policy); returns the steps a plain round may run in one call."""
        running = [row for row in rows if row.started and not row.finish]
        for row in running:
            row.round_k = 0
        if not running:
            return 1
        width = max(row.slot for row in running) + 1
        target_batch = self.target.layout.batch_bucket(width)
        prefilling = any(not row.started and not row.finish for row in rows)
        multi = self.target.multi_step and not prefilling and not (
            self.proposer is not None and self.proposer.pins_every_position(rows))
        steps = self.policy.decode_steps(target_batch, any(row.request.streamed for row in running)) if multi else 1
        if self.proposer is None:
            return steps
        drafted = [row for row in running if row.k and self.proposer.can_propose(row)]
        for row in drafted:
            row.round_k = 0 if row.adaptive else row.k
        adaptive = [row for row in drafted if row.adaptive]
        if adaptive:
            prior = self.policy.draft.acceptance
            speculating = [SpeculatingRow(acceptance_estimate(row.stats.accepted, row.trials, prior), 0 if row.adaptive else row.k,
                                          row.k, len(row.sequence) - row.draft_cached) for row in drafted]
            draft_batch = self.proposer.endpoint.layout.batch_bucket(max(row.slot for row in drafted) + 1)
            k = self.policy.choose(speculating, len(running) - len(drafted), target_batch, draft_batch, steps)
            for row in adaptive:
                row.round_k = min(k, row.k)
        return steps

    def _prefill_round(self, plan: RoundPlan) -> None:
        bucket, inputs = prefill_inputs(self.target.layout, list(plan.prompts))
        logits = self.target.run(Forward(bucket, inputs))[0][:, 0].float()
        if plan.draft_prompts and self.proposer is not None:  # None: lost earlier in this step
            try:
                self.proposer.prefill(plan)
            except DraftUnavailable as exc:
                self._lose_draft(exc)
        for slot in plan.prefill:
            row = self.slots[slot]
            fed = len(plan.prompts[slot])
            # a resumed row emits nothing here: its next round starts where the lost replica's would have
            drafted = row.k and not row.adaptive
            row.advance([] if row.request.resumed else [row.pick(logits[slot])], target=fed, draft=fed if drafted else 0)
            self._prefilled(row)

    def _chunk_round(self, plan: RoundPlan) -> None:
        """The next chunk of each chunked row's prompt, in one `extend` call; a row whose last chunk
        this is takes its first token as a whole prefill would have (no draft: its prompt is longer
        than a draft prefills, so it decodes without a model draft)."""
        tokens, starts = [list(t) for t in plan.chunks.tokens], list(plan.chunks.starts)
        bucket, inputs = step_inputs(self.target.layout, "extend", tokens, starts)
        started = time.perf_counter()
        logits = self.target.run(Forward(bucket, inputs))[0][:, 0].float()
        self.policy.called(time.perf_counter() - started)
        for slot, chunk in enumerate(tokens):
            if chunk[0] < 0:
                continue
            row = self.slots[slot]
            if row.cached + len(chunk) < len(row.prefill_tokens()):
                row.cached += len(chunk)
            else:
                row.advance([] if row.request.resumed else [row.pick(logits[slot])], target=len(chunk))
                self._prefilled(row)

    def _prefilled(self, row: LiveSequence) -> None:
        if self.prefixes is not None:  # its prompt is in its row now: a prompt starting the same way may copy it
            self.prefixes.prefilled(row.slot, row.prefill_tokens())

    def _decode_round(self, plan: RoundPlan) -> None:
        logits = self._target_step(DECODE, plan.target.tokens, plan.target.starts)[:, 0]
        for slot in plan.running:
            row = self.slots[slot]
            row.advance([row.pick(logits[slot])], target=1)
            if row.draft_lost:
                row.stats.target_only_steps += 1

    def _multi_step_round(self, plan: RoundPlan) -> None:
        """Up to plan.decode_steps decode steps of every running row in one call (`DecodeSteps`): each row makes
        at most what it still may, stops at its eos, and takes what it made as it would over as many
        one-step rounds (the ranks sample from the same per-position generators)."""
        width, steps = plan.target.width, plan.decode_steps
        budgets, eos, seeds, lengths = [0] * width, [-1] * width, [0] * width, [0] * width
        sampling = [SamplingParams()] * width
        rows = [self.slots[slot] for slot in plan.running]
        for row in rows:
            left = row.request.max_new_tokens - (len(row.sequence) - row.prompt_length)
            budgets[row.slot] = max(1, min(steps, left))
            eos[row.slot] = -1 if row.request.eos_token_id is None else row.request.eos_token_id
            sampling[row.slot], seeds[row.slot], lengths[row.slot] = row.request.sampling, row.seed, len(row.sequence)
        call = DecodeSteps(tuple(t[0] for t in plan.target.tokens), plan.target.starts, tuple(budgets),
                           self.target.layout, tuple(sampling), tuple(seeds), tuple(lengths), tuple(eos))
        started = time.perf_counter()
        made = self.target.run(call).tolist()
        elapsed = time.perf_counter() - started
        self.policy.called(elapsed)
        batch = self.target.layout.batch_bucket(width)
        self.policy.observe(DECODE_CALL, batch, elapsed / max(1, len(made[0])), graph=batch)
        for row in rows:
            tokens = [t for t in made[row.slot] if t >= 0]
            row.advance(tokens, target=len(tokens))
            if row.draft_lost:
                row.stats.target_only_steps += len(tokens)

    def _speculative_round(self, plan: RoundPlan) -> None:
        """One draft/verify round over every running row: gpt-fast's `speculative_decode`, batched.

        Rows that do not speculate ride along in the verify forward with their one token. A draft
        that fails costs the round nothing: it decodes target-only (the target's feed is the same).
        """
        rows = [self.slots[slot] for slot in plan.running]
        try:
            if plan.catch_up:  # 0. Catch up lagging draft caches, in one draft prefill.
                self.proposer.catch_up(plan)
                for slot, prompt in enumerate(plan.catch_up):
                    if prompt is not None:
                        self.slots[slot].draft_cached = len(prompt)
            proposals = self.proposer.propose(plan, rows)  # 1. Propose (a fused draft verifies too).
        except DraftUnavailable as exc:
            self._lose_draft(exc)
            self._decode_round(plan)
            return
        logits = proposals.logits
        if logits is None:  # 2. Verify: each row's last token and its own k proposals in one forward.
            fed = [list(tokens) for tokens in plan.target.tokens]
            for row in rows:
                if row.round_k:
                    fed[row.slot] += proposals.tokens[row.slot, : row.round_k].tolist()
            logits = self._target_step(VERIFY, fed, plan.target.starts)
        self._verify(plan, rows, proposals.tokens, proposals.q, logits)

    def _verify(self, plan: RoundPlan, rows: list[LiveSequence], proposals: torch.Tensor, q: torch.Tensor | None,
                logits: torch.Tensor) -> None:
        """Accept each speculating row's longest verified run of proposals and its next token."""
        # greedy rows verify against the target's argmax, taken once for the whole batch
        choices = logits.argmax(-1).tolist() if any(row.request.sampling.greedy for row in rows) else []
        proposed_ids = proposals.tolist()
        for row in rows:
            k = row.round_k
            if not k:
                row.advance([row.pick(logits[row.slot, 0])], target=1)
                continue
            # 3. Accept a prefix of the proposals: greedy, those equal to the target's argmax, then its
            # choice there (`verify_draft`'s greedy rule, on plain lists); sampled, with min(1, p/q)
            # and a resample at the first rejection.
            params = row.request.sampling
            if params.greedy:
                target, mine = choices[row.slot], proposed_ids[row.slot][:k]
                a = next((i for i in range(k) if mine[i] != target[i]), k)
                emitted = mine[:a] + [target[a]]
            else:
                proposed = proposals[row.slot : row.slot + 1, :k]
                p = probabilities(logits[row.slot : row.slot + 1, : k + 1], params)
                q_row = q[row.slot : row.slot + 1, :k] if q is not None else torch.nn.functional.one_hot(proposed, p.shape[-1]).float()
                out, accepted = verify_draft(proposed, q_row, p, row.generator, greedy=False)
                a = int(accepted[0])
                emitted = out[0, : a + 1].tolist()
            # 4. Update: the target keeps the fed token and the accepted proposals, the draft what it fed of them.
            row.stats.add(k, a)
            row.trials += self.policy.accepted(a, k)
            row.advance(emitted, target=1 + a, draft=self.proposer.kept(plan, row, a))

    def _target_step(self, kind: str, tokens: Sequence[Sequence[int]], starts: Sequence[int]) -> torch.Tensor:
        """The target's logits [B, n, V] (float) for a decode or verify step."""
        bucket, inputs = step_inputs(self.target.layout, kind, [list(t) for t in tokens], list(starts))
        n = 1 if kind == DECODE else self.target.layout.verify_tokens
        started = time.perf_counter()
        logits = self.target.run(Forward(bucket, inputs))[0]
        elapsed = time.perf_counter() - started
        self.policy.called(elapsed)
        batch = self.target.layout.batch_bucket(len(tokens))
        self.policy.observe(DECODE_CALL if kind == DECODE else VERIFY_CALL, batch, elapsed, graph=bucket)
        return logits[:, :n].float()

    def _lose_draft(self, exc: DraftUnavailable) -> None:
        """The draft failed: every sequence that speculated goes on target-only, and the batch
        forgets the draft (a later request may bring one again, for itself)."""
        rows = [row for row in self.slots.values() if row.k]
        for row in rows:
            row.k, row.round_k, row.draft_lost = 0, 0, True
        self.proposer = None
        log.warning("%s: %s; %d sequence(s) go on without speculation", self.target.name, str(exc).splitlines()[0],
                    len(rows))


__all__ = ["DecodeBatch", "DecoderEndpoint", "stop_matched"]
