"""The generation loop: continuous batching over a decoder's KV-cache slots, with optional speculation.

A decoder's KV cache has `max_batch` rows; each row is a slot that one sequence holds from the
moment it is admitted until its session is closed. `DecodeBatch.step()` runs one round in three
parts: plan (`cluster.generation.plan.plan_round`, pure, from the sequences' state), execute
(the calls to the models' ranks) and update (the sequences take the results: tokens, cache
lengths, counts). Sequences admitted since the last round are prefilled together (the other
rows' tokens go to the scratch slot, so their caches are untouched); the running ones decode one
token or, when some of them speculate, run one draft/verify round. A new request therefore joins
at the next round and a finished one leaves without waiting for the others: continuous batching.

Every sequence keeps its own sampling parameters and random generator, so what a seeded request
generates does not depend on what else shares the batch. The generator is drawn afresh each
round from the sequence's seed and its length (`position_generator`), so a sequence carried on
elsewhere (`GenerationRequest.resumed`: another replica prefills the prompt plus what was already
generated) continues the same random stream. A round is one round trip per model: the
draft proposes k tokens in one call on its ranks (`DraftPlan`), the target verifies them in one
`verify` forward. Rolling back rejected tokens is free, because what a query may attend to is
decided by the lengths kept here, not by the cache contents.

A request that leaves speculation_length at 0 lets each round choose its k
(`cluster.generation.adaptive.choose_k`): the batch times every model call it makes and counts each
sequence's accepted proposals, and a round speculates only as deep as pays at the current batch
size (k = 0: those rows decode plainly, their draft cache catching up when they speculate again).
An adaptive row's draft is not prefilled at admission: the first round that has it speculate
prefills the draft over its sequence so far (`_catch_up_drafts`, which also serves a draft that
lags by more than stepping through costs), so a busy batch that never speculates never pays for
its draft. Speculation that lost at a batch size is not measured at a larger one (`_lost_below`).
A request that pins k keeps it. Greedy output is the target's whatever k each round takes;
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
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from cluster.errors import ClusterError, DraftUnavailable, InputError, Overloaded
from cluster.generation.adaptive import (DECODE_CALL, DRAFT_PREFILL, DRAFT_STEP, ROUND_OVERHEAD, VERIFY_CALL, CallCosts,
                                         SpeculatingRow, acceptance_estimate, catch_up_s, explore, rates)
from cluster.generation.layout import DecoderLayout, prefill_inputs, step_inputs
from cluster.generation.plan import (DECODE, VERIFY, Call, DecodeSteps, DraftPlan, Forward, FusedRound, RoundPlan, RowState,
                                     draft_tokens_kept, plan_round)
from cluster.generation.ngram import NgramIndex
from cluster.generation.sampling import make_generator, position_generator, probabilities, sample
from cluster.generation.speculative import SpeculationStats, verify_draft
from cluster.generation.types import GenerationRequest, SamplingParams, SessionSummary, StepResult

log = logging.getLogger("tpcluster.generation")


@dataclass
class DecoderEndpoint:
    """What the loop needs of one model: its layout and vocabulary, and one call to its ranks,
    `run(call)`, where call is one of the cluster.generation.plan call types.

    multi_step: its ranks run `DecodeSteps` (several decode steps in one call). A draft fused into
    the target (its ranks run `FusedRound`) has an endpoint of its own that is `fused`: its calls go
    to the target's ranks.
    """

    run: Callable[[Call], Any]
    layout: DecoderLayout
    vocab_size: int
    name: str = "model"
    key: str = ""  # identifies the replica (and so its KV cache) behind the calls
    fused: bool = False
    multi_step: bool = False
    ngram: bool = False  # no draft model: proposals by n-gram lookup in each row's own tokens (cluster.generation.ngram)


def stop_matched(sequence: Sequence[int], start: int, stops: Sequence[Sequence[int]]) -> int:
    """The length of the first of `stops` that sequence[start:] ends with; 0 when none does."""
    for stop in stops:
        n = len(stop)
        if len(sequence) - start >= n and tuple(sequence[len(sequence) - n:]) == tuple(stop):
            return n
    return 0


@dataclass
class _Sequence:
    slot: int
    session: int
    sequence: list[int]  # prompt + emitted
    prompt_length: int
    request: GenerationRequest
    k: int  # draft proposals per round (adaptive: the most a round may ask); 0: no speculation
    seed: int  # with the sequence's length, what seeds each round's generator
    adaptive: bool = False  # each round picks its k, up to `k`
    round_k: int = 0  # this round's proposals
    trials: int = 0  # accepted proposals plus each round's first rejection: the acceptance estimate's base
    cached: int = 0  # tokens of the sequence in the target's cache
    draft_cached: int = 0
    started: bool = False
    draft_lost: bool = False  # it speculated until its draft failed: target-only since
    finish: str = ""
    outbox: list[int] = field(default_factory=list)
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    generator: torch.Generator | None = None  # this round's (`new_round`)
    ngrams: NgramIndex | None = None  # proposals without a draft model (`NGRAM_DRAFT`)

    def new_round(self) -> None:
        """Draw this round's generator from the seed and the sequence's length."""
        self.generator = position_generator(self.seed, len(self.sequence))

    def state(self) -> RowState:
        # a new row that pins k has its draft prefilled with the target; an adaptive one when a round
        # first has it speculate (`DecodeBatch._catch_up_drafts`): a busy batch may never ask it to
        k = self.round_k if self.started else (0 if self.adaptive else self.k)
        # a resumed row is prefilled up to its last token, which the next round feeds, as it would have
        tokens = self.sequence[:-1] if self.request.resumed and not self.started else self.sequence
        return RowState(self.slot, tuple(tokens), k, self.started, bool(self.finish), self.cached, self.draft_cached)

    def advance(self, tokens: list[int], target: int, draft: int = 0) -> None:
        """Take one round's result: `target` / `draft` more of the sequence's tokens are now in each
        model's cache, and `tokens` follow it."""
        self.started = True
        self.cached += target
        self.draft_cached += draft
        self.emit(tokens)

    def emit(self, tokens: list[int]) -> None:
        """Append tokens up to the first that finishes the sequence.

        A completed stop sequence is taken back out of the sequence and of the outbox; those of its
        tokens that an earlier `take` already handed out stay handed out (the caller saw them).
        """
        for token in map(int, tokens):
            if self.finish:
                return
            self.sequence.append(token)
            self.outbox.append(token)
            stop = stop_matched(self.sequence, self.prompt_length, self.request.stop_sequences)
            if stop:
                del self.sequence[-stop:]
                del self.outbox[max(0, len(self.outbox) - stop):]
                self.finish = "stop"
            elif token == self.request.eos_token_id:
                self.finish = "eos"
            elif len(self.sequence) - self.prompt_length >= self.request.max_new_tokens:
                self.finish = "length"

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from logits [V] under this sequence's own parameters and generator."""
        params = self.request.sampling
        if params.greedy:
            return int(logits.argmax())
        return int(sample(probabilities(logits[None].float(), params), self.generator)[0])

    def draft_seed(self) -> int:
        """A seed for the draft's sampling this round, from this round's generator."""
        return int(torch.randint(0, 2**62, (1,), generator=self.generator))


def _validate(request: GenerationRequest, target: DecoderEndpoint, draft: DecoderEndpoint | None) -> tuple[int, bool]:
    """Check a request against the models; returns (its speculation length, 0 without a draft; whether
    rounds pick it, up to that length)."""
    prompts = request.prompts
    if not prompts or any(not p for p in prompts):
        raise InputError("every prompt needs at least one token; send non-empty prompts")
    if request.max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
    if not 0 <= request.resumed < min(map(len, prompts)) or request.resumed >= request.max_new_tokens:
        raise InputError(f"resumed={request.resumed}: the generated tokens a prompt ends with must leave a prompt "
                         "token and fewer than max_new_tokens")
    if any(not stop or any(not isinstance(t, int) or t < 0 for t in stop) for stop in request.stop_sequences):
        raise InputError("stop sequences must be non-empty sequences of token ids")
    longest = max(map(len, prompts))
    if longest > max(target.layout.prompt_buckets):
        raise InputError(f"prompt of {longest} tokens is above the largest context bucket {max(target.layout.prompt_buckets)}; shorten it")
    if len(prompts) > target.layout.max_batch:
        raise InputError(f"{len(prompts)} prompts in one request; model {target.name!r} holds at most "
                         f"{target.layout.max_batch} sequences: split the request")
    k = request.speculation_length if draft is not None else 0
    adaptive = draft is not None and k == 0
    if draft is not None:
        if draft.vocab_size != target.vocab_size:
            raise InputError(f"draft {draft.name!r} has a vocabulary of {draft.vocab_size}, target {target.name!r} "
                             f"{target.vocab_size}: draft and target must share a tokenizer and vocabulary")
        if target.layout.verify_tokens < 2:
            raise InputError(f"{target.name!r} was traced without verification graphs (verify_tokens): it cannot be "
                             "a speculation target; generate without a draft, or retrace it with verify_tokens")
        if adaptive:
            k = target.layout.verify_tokens - 1
        if not 1 <= k < target.layout.verify_tokens:
            raise InputError(f"speculation_length must be 1..{target.layout.verify_tokens - 1} (or 0: adaptive) for "
                             f"{target.name!r} (its verification bucket holds {target.layout.verify_tokens} tokens), got {k}")
    room = min(target.layout.scratch, draft.layout.scratch if draft else target.layout.scratch)
    if longest + request.max_new_tokens - request.resumed + k + 1 > room:
        raise InputError(f"prompt ({longest}) + max_new_tokens ({request.max_new_tokens}) does not fit the KV cache "
                         f"({room - k - 1} tokens); lower max_new_tokens")
    return k, adaptive


class DecodeBatch:
    """The sequences sharing one decoder's KV cache, one slot (cache row) each.

    `open` admits a request's prompts (one sequence each) and returns a session id; `step` advances
    every live sequence; `take` hands a session the tokens generated since its last take; `close`
    frees its slots. A session belongs to whoever opened it, who closes it. One draft model at a
    time serves the batch's speculating sequences: its cache rows mirror the target's slots.

    `costs` and `acceptance` are what adaptive rounds decide from: the measured seconds of each
    kind of call per batch bucket, and the pair's running per-token acceptance.
    """

    # The option not taken (plain decoding, or speculating) is run once more after this many adaptive
    # rounds when its expected rate is within this share of the chosen one: its costs drift with the
    # machine's load, and a stale estimate must not lock the batch into one option.
    RECHECK_ROUNDS = 20
    RECHECK_SHARE = 0.7
    # Multi-step decoding (vLLM's num_scheduler_steps): a round whose rows all decode plainly, with
    # no row to prefill, runs up to MAX_DECODE_STEPS steps in one call to the target's ranks, so the
    # round trip and the round's bookkeeping are paid once for several tokens. It runs as many as
    # fit in MULTI_STEP_S at the measured cost of a step, which bounds how long a request arriving
    # meanwhile waits to join, and how far a stream's tokens bunch up. At 40 ms (4-5 steps of the
    # shipped target at TP=2 here) the round trips were 1.0 ms of a 7.9 ms step; at 64 ms (8 steps),
    # 0.7 ms.
    MAX_DECODE_STEPS = 8
    MULTI_STEP_S = 0.064

    def __init__(self, target: DecoderEndpoint) -> None:
        self.target = target
        self.draft: DecoderEndpoint | None = None
        self.slots: dict[int, _Sequence] = {}
        self.sessions: dict[int, list[_Sequence]] = {}
        self._last_session = 0
        self.costs = CallCosts()
        self.acceptance = 0.6  # the prior of a new sequence's acceptance; follows the pair's measured rate
        self._adaptive_rounds = 0
        self._last_taken: dict[tuple[bool, int], int] = {}  # (speculated?, batch bucket) -> adaptive round
        self._paid: dict[int, bool] = {}  # batch bucket -> whether its last choice from measured costs speculated
        self._last_step: tuple[float, float] | None = None  # (when the last step began, seconds in its model calls)
        self._calls_s = 0.0  # seconds in model calls during this step

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
        k, adaptive = _validate(request, self.target, draft)
        rows = len(request.prompts)
        if draft is not None and self.draft is not None and self.draft.key != draft.key and self._speculating():
            raise Overloaded(f"{self.target.name!r} is speculating with another draft replica; retry shortly")
        limit = self.capacity if draft is None else min(self.capacity, draft.layout.max_batch)
        free = [slot for slot in range(limit) if slot not in self.slots][:rows]
        if len(free) < rows:
            raise Overloaded(f"all {self.capacity} sequence slots of {self.target.name!r} are generating; retry shortly")
        if draft is not None:
            self.draft = draft
        self._last_session += 1
        session = self._last_session
        generator = make_generator(request.sampling.seed)
        members = []
        for slot, prompt in zip(free, request.prompts):
            row_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            member = _Sequence(slot, session, list(prompt), len(prompt) - request.resumed, request, k, row_seed, adaptive)
            self.slots[slot] = member
            members.append(member)
        self.sessions[session] = members
        return session

    def _speculating(self) -> bool:
        return any(s.k for s in self.slots.values())

    def close(self, session: int) -> SessionSummary | None:
        """Free the session's slots; its summary, or None when it is not open."""
        members = self.sessions.pop(session, None)
        if members is None:
            return None
        stats = SpeculationStats()
        for member in members:
            del self.slots[member.slot]
            stats = stats.merge(member.stats)
        if not self._speculating():
            self.draft = None
        return SessionSummary([m.sequence for m in members], [m.prompt_length for m in members],
                              [m.finish for m in members], stats)

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

    # -- rounds: plan, execute, update ------------------------------------------------------
    def step(self) -> None:
        """One round for every live sequence; new tokens go to each sequence's outbox."""
        self._time_round()
        for row in self.slots.values():
            row.new_round()
        self._choose_round_k()
        self._catch_up_drafts()
        proposals = self._ngram_proposals()  # before the plan: a round where no row's tokens repeat is a plain one
        plan = plan_round([s.state() for s in self.slots.values()])
        if plan.step == VERIFY:
            self._speculative_round(plan, proposals)
        elif plan.step == DECODE:
            steps = self._multi_steps(plan.target.width, bool(plan.prefill))
            if steps > 1:
                self._multi_step_round(plan, steps)
            else:
                self._decode_round(plan)
        if plan.prefill:
            self._prefill_round(plan)
        if self.draft is not None and self.draft.ngram:  # no draft cache to keep: it is as long as the target's
            for row in self.slots.values():
                row.draft_cached = row.cached

    def _prefill_round(self, plan: RoundPlan) -> None:
        bucket, inputs = prefill_inputs(self.target.layout, list(plan.prompts))
        logits = self.target.run(Forward(bucket, inputs))[0][:, 0].float()
        if plan.draft_prompts and self.draft is not None and not self.draft.ngram:  # None: lost earlier in this step
            try:
                self._on_draft(Forward(*prefill_inputs(self.draft.layout, list(plan.draft_prompts))))
            except DraftUnavailable as exc:
                self._lose_draft(exc)
        for slot in plan.prefill:
            row = self.slots[slot]
            fed = len(plan.prompts[slot])
            # a resumed row emits nothing here: its next round starts where the lost replica's would have
            drafted = row.k and not row.adaptive
            row.advance([] if row.request.resumed else [row.pick(logits[slot])], target=fed, draft=fed if drafted else 0)

    def _decode_round(self, plan: RoundPlan) -> None:
        logits = self._target_step(DECODE, plan.target.tokens, plan.target.starts)[:, 0]
        for slot in plan.running:
            row = self.slots[slot]
            row.advance([row.pick(logits[slot])], target=1)
            if row.draft_lost:
                row.stats.target_only_steps += 1

    def _pinned_ngram(self) -> bool:
        """A row pins its n-gram k: it looks for a match at every position, so plain rounds run one step."""
        return self.draft is not None and self.draft.ngram and any(
            row.k and not row.adaptive and not row.finish for row in self.slots.values())

    def _multi_steps(self, width: int, prefilling: bool) -> int:
        """How many decode steps a plain round over `width` cache rows runs in one call: 1 while rows
        wait to be prefilled, else what fits in MULTI_STEP_S at the measured cost of a step (one
        step first, to measure it). Rows with a draft that the round does not speculate take part:
        the adaptive choice weighs a decode step at what it costs as run."""
        if not self.target.multi_step or prefilling or self._pinned_ngram():
            return 1
        step_s = self.costs.get(DECODE_CALL, self.target.layout.batch_bucket(width))
        if not step_s:
            return 1
        return max(1, min(self.MAX_DECODE_STEPS, int(self.MULTI_STEP_S / step_s)))

    def _multi_step_round(self, plan: RoundPlan, steps: int) -> None:
        """Up to `steps` decode steps of every running row in one call (`DecodeSteps`): each row makes
        at most what it still may, stops at its eos, and takes what it made as it would over as many
        one-step rounds (the ranks sample from the same per-position generators)."""
        width = plan.target.width
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
        self._called(elapsed)
        self.costs.observe(DECODE_CALL, self.target.layout.batch_bucket(width), elapsed / max(1, len(made[0])))
        for row in rows:
            tokens = [t for t in made[row.slot] if t >= 0]
            row.advance(tokens, target=len(tokens))
            if row.draft_lost:
                row.stats.target_only_steps += len(tokens)

    def _speculative_round(self, plan: RoundPlan, ngram_proposals: torch.Tensor | None = None) -> None:
        """One draft/verify round over every running row: gpt-fast's `speculative_decode`, batched.

        Rows that do not speculate ride along in the verify forward with their one token. With
        n-gram lookup instead of a draft model, `ngram_proposals` are the rows' proposals.
        """
        rows = [self.slots[slot] for slot in plan.running]
        drafted = [row for row in rows if row.round_k]
        if self.draft.ngram:
            proposals = ngram_proposals
            fed = [list(tokens) for tokens in plan.target.tokens]
            for row in drafted:
                fed[row.slot] += proposals[row.slot, : row.round_k].tolist()
            self._verify(plan, rows, proposals, None, self._target_step(VERIFY, fed, plan.target.starts))
            return
        # 1. Propose: the draft samples k_max tokens per speculating row, in one call to its ranks.
        sampling, seeds = [SamplingParams()] * plan.draft.width, [0] * plan.draft.width
        for row in drafted:
            sampling[row.slot], seeds[row.slot] = row.request.sampling, row.draft_seed()
        draft_plan = DraftPlan(plan.draft.tokens, plan.draft.starts, plan.k_max, self.draft.layout, tuple(sampling),
                               tuple(seeds), want_probs=any(not row.request.sampling.greedy for row in drafted))
        steps = len(plan.draft.tokens[0]) + plan.k_max - 1
        if self.draft.fused:  # 1 + 2 in one call to the target's ranks, each holding the draft
            proposals, q, logits = self._fused_round(plan, draft_plan, steps)
        else:
            started = time.perf_counter()
            try:
                proposals, q = self._on_draft(draft_plan)
                self._called(time.perf_counter() - started)
                self.costs.observe(DRAFT_STEP, self.draft.layout.batch_bucket(plan.draft.width),
                                   (time.perf_counter() - started) / steps)
            except DraftUnavailable as exc:
                # The target's feed is the same in a decode round: this round still makes every row's token.
                self._lose_draft(exc)
                self._decode_round(plan)
                return
            # 2. Verify: the target scores each row's last token and its own k proposals in one forward.
            fed = [list(tokens) for tokens in plan.target.tokens]
            for row in drafted:
                fed[row.slot] += proposals[row.slot, : row.round_k].tolist()
            logits = self._target_step(VERIFY, fed, plan.target.starts)
        self._verify(plan, rows, proposals, q, logits)

    def _verify(self, plan: RoundPlan, rows: list[_Sequence], proposals: torch.Tensor, q: torch.Tensor | None,
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
            self._accepted(row, a, k)
            kept = 1 + a if self.draft.ngram else draft_tokens_kept(plan.draft.tokens[row.slot], a, plan.k_max)
            row.advance(emitted, target=1 + a, draft=kept)

    def _ngram_proposals(self) -> torch.Tensor | None:
        """With n-gram lookup as the draft, each speculating row's proposals, up to its round's k, by
        slot [B, k_max] (0-padded); a row without a match proposes none this round (its round_k drops
        to 0, so a round where none has any is a plain one: multi-step when every such row lets rounds
        pick k). None: no row has any."""
        if self.draft is None or not self.draft.ngram:
            return None
        drafted = [row for row in self.slots.values() if row.round_k and not row.finish]
        if not drafted:
            return None
        started = time.perf_counter()
        found = {}
        for row in drafted:
            row.ngrams = row.ngrams or NgramIndex()
            found[row.slot] = row.ngrams.propose(row.sequence, row.round_k)
            row.round_k = len(found[row.slot])
        steps = max(map(len, found.values()), default=0)
        self.costs.observe(DRAFT_STEP, self.draft.layout.batch_bucket(max(found, default=0) + 1),
                           (time.perf_counter() - started) / max(1, steps))
        if not steps:
            return None
        out = torch.zeros(max(found) + 1, steps, dtype=torch.int64)
        for slot, tokens in found.items():
            out[slot, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        return out

    def _target_step(self, kind: str, tokens: Sequence[Sequence[int]], starts: Sequence[int]) -> torch.Tensor:
        """The target's logits [B, n, V] (float) for a decode or verify step."""
        bucket, inputs = step_inputs(self.target.layout, kind, [list(t) for t in tokens], list(starts))
        n = 1 if kind == DECODE else self.target.layout.verify_tokens
        started = time.perf_counter()
        logits = self.target.run(Forward(bucket, inputs))[0]
        self._called(time.perf_counter() - started)
        self.costs.observe(DECODE_CALL if kind == DECODE else VERIFY_CALL, self.target.layout.batch_bucket(len(tokens)),
                           time.perf_counter() - started)
        return logits[:, :n].float()

    def _time_round(self) -> None:
        """Measure what the last round cost outside its model calls (when rounds run back to back)."""
        now = time.perf_counter()
        if self._last_step is not None:
            began, calls = self._last_step
            if now - began < 1.0:  # back to back; a longer gap was idle time
                self.costs.observe(ROUND_OVERHEAD, 0, max(0.0, now - began - calls))
        self._last_step, self._calls_s = (now, 0.0), 0.0

    def _called(self, seconds: float) -> None:
        self._calls_s += seconds
        if self._last_step is not None:
            self._last_step = (self._last_step[0], self._calls_s)

    def _fused_round(self, plan: RoundPlan, draft_plan: DraftPlan, steps: int) -> tuple[Any, Any, torch.Tensor]:
        """Proposals, draft probabilities and the target's verify logits from one call to the
        target's ranks (the draft is fused into it); its failure is the target's."""
        ks = [0] * len(plan.target.tokens)
        for slot in plan.running:
            ks[slot] = self.slots[slot].round_k
        started = time.perf_counter()
        proposals, q, logits, draft_s = self.target.run(FusedRound(
            draft_plan, plan.target.tokens, plan.target.starts, tuple(ks), self.target.layout))
        elapsed = time.perf_counter() - started
        self._called(elapsed)
        self.costs.observe(DRAFT_STEP, self.draft.layout.batch_bucket(plan.draft.width), draft_s / steps)
        self.costs.observe(VERIFY_CALL, self.target.layout.batch_bucket(len(plan.target.tokens)), max(0.0, elapsed - draft_s))
        return proposals, q, logits.float()

    # -- adaptive speculation -----------------------------------------------------------------
    def _choose_round_k(self) -> None:
        """Set each running row's proposals for the next round: a pinned k as asked, an adaptive one
        from `choose_k` over the measured costs at this batch size (or what is still unmeasured).
        An adaptive row whose draft was never prefilled and whose sequence no longer fits the
        draft's largest prompt bucket decodes plainly (catching it up token by token would cost
        more than speculation could win)."""
        running = [s for s in self.slots.values() if s.started and not s.finish]
        for row in running:
            row.round_k = 0
        if self.draft is None:
            return
        drafted = [s for s in running if s.k and (s.draft_cached or self.draft.ngram or self._draft_prefillable(s))]
        for row in drafted:
            row.round_k = 0 if row.adaptive else row.k
        adaptive = [s for s in drafted if s.adaptive]
        if not adaptive:
            return
        width = max(s.slot for s in running) + 1
        target_batch = self.target.layout.batch_bucket(width)
        draft_batch = self.draft.layout.batch_bucket(max(s.slot for s in drafted) + 1)
        decode_s, verify_s = self.costs.get(DECODE_CALL, target_batch), self.costs.get(VERIFY_CALL, target_batch)
        step_s = self.costs.get(DRAFT_STEP, draft_batch)
        cap = max(s.k for s in adaptive)
        k = explore(decode_s, verify_s, step_s, cap)
        if k and self._lost_below(target_batch):
            k = 0  # not worth measuring: speculation lost at a smaller batch, and it only loses more as batches grow
        if k is None:
            rows = [SpeculatingRow(acceptance_estimate(s.stats.accepted, s.trials, self.acceptance),
                                   0 if s.adaptive else s.k, s.k, len(s.sequence) - s.draft_cached) for s in drafted]
            prefilling = any(not s.started and not s.finish for s in self.slots.values())
            by_k = rates(rows, len(running) - len(drafted), decode_s, verify_s, step_s,
                         self.costs.get(ROUND_OVERHEAD, 0) or 0.0, self._multi_steps(width, prefilling),
                         self._draft_prefill_s(draft_batch))
            k = max(range(len(by_k)), key=lambda j: (by_k[j], -j))
            other = max(range(1, len(by_k)), key=lambda j: (by_k[j], -j)) if k == 0 else 0
            self._adaptive_rounds += 1
            last = self._last_taken.get((other > 0, target_batch), 0)
            if self._adaptive_rounds - last >= self.RECHECK_ROUNDS and by_k[other] >= self.RECHECK_SHARE * by_k[k]:
                k = other  # and what it costs is measured afresh: the old samples are as stale as the choice
                for kind, batch in ([(VERIFY_CALL, target_batch), (DRAFT_STEP, draft_batch)] if k
                                    else [(DECODE_CALL, target_batch)]):
                    self.costs.forget(kind, batch)
            else:
                self._paid[target_batch] = k > 0
        self._last_taken[(k > 0, target_batch)] = self._adaptive_rounds
        for row in adaptive:
            row.round_k = min(k, row.k)

    def _lost_below(self, target_batch: int) -> bool:
        """Whether the last choice made from measured costs at the nearest smaller batch bucket was to
        decode plainly. A verify forward costs more decode forwards the more rows it carries, so
        speculation that loses at a batch size loses at every larger one (vLLM turns it off above a
        batch size); measuring it there would cost a draft prefill and a verify round of the whole
        batch for nothing."""
        smaller = [b for b in self._paid if b < target_batch]
        return bool(smaller) and not self._paid[max(smaller)]

    def _draft_prefillable(self, row: _Sequence) -> bool:
        """Whether a draft prefill can take the row's sequence (all of it but the last token)."""
        return len(row.sequence) - 1 <= max(self.draft.layout.prompt_buckets)

    def _draft_prefill_s(self, draft_batch: int) -> float | None:
        """A draft prefill's cost at this batch bucket: measured, else the target's verify forward
        as a first guess (a forward over a few dozen tokens of the smaller model); None: neither known."""
        measured = self.costs.get(DRAFT_PREFILL, draft_batch)
        return measured if measured is not None else self.costs.get(VERIFY_CALL, self.target.layout.batch_bucket(draft_batch))

    def _catch_up_drafts(self) -> None:
        """Prefill the draft, in one call, for the rows this round has speculate whose draft cache is
        empty (an adaptive row's draft is not prefilled at admission) or lags by more than stepping
        through costs: each gets all of its sequence but the last token, which the round feeds."""
        if self.draft is None or self.draft.ngram:
            return
        speculating = [row for row in self.slots.values() if row.round_k and not row.finish]
        if not speculating:
            return
        batch = self.draft.layout.batch_bucket(max(row.slot for row in speculating) + 1)
        step_s, prefill_s = self.costs.get(DRAFT_STEP, batch) or 0.0, self._draft_prefill_s(batch)
        rows = [row for row in speculating if self._draft_prefillable(row) and (
            not row.draft_cached
            or (prefill_s is not None and catch_up_s(len(row.sequence) - row.draft_cached, step_s) > prefill_s))]
        if not rows:
            return
        prompts: list[tuple[int, ...] | None] = [None] * (max(row.slot for row in rows) + 1)
        for row in rows:
            prompts[row.slot] = tuple(row.sequence[:-1])
        started = time.perf_counter()
        try:
            self._on_draft(Forward(*prefill_inputs(self.draft.layout, prompts)))
        except DraftUnavailable as exc:
            self._lose_draft(exc)
            return
        elapsed = time.perf_counter() - started
        self._called(elapsed)
        self.costs.observe(DRAFT_PREFILL, self.draft.layout.batch_bucket(len(prompts)), elapsed)
        for row in rows:
            row.draft_cached = len(row.sequence) - 1

    def _accepted(self, row: _Sequence, accepted: int, k: int) -> None:
        """Count a verified round into the row's and the pair's acceptance: `accepted` of k proposals,
        and one rejection unless all were accepted."""
        trials = accepted + (1 if accepted < k else 0)
        row.trials += trials
        self.acceptance += 0.05 * (accepted / trials - self.acceptance)

    def _lose_draft(self, exc: DraftUnavailable) -> None:
        """The draft failed: every sequence that speculated goes on target-only, and the batch
        forgets the draft (a later request may bring one again, for itself)."""
        rows = [row for row in self.slots.values() if row.k]
        for row in rows:
            row.k, row.round_k, row.draft_lost = 0, 0, True
        self.draft = None
        log.warning("%s: %s; %d sequence(s) go on without speculation", self.target.name, str(exc).splitlines()[0],
                    len(rows))

    def _on_draft(self, call: Call) -> Any:
        """A call to the draft's ranks; its failure is the draft's, not this (target) model's (a fused
        draft's ranks are the target's: its failure is the target's)."""
        if self.draft.fused:
            return self.draft.run(call)
        try:
            return self.draft.run(call)
        except (InputError, Overloaded):
            raise
        except ClusterError as exc:
            raise DraftUnavailable(f"draft model {self.draft.name!r} failed: {str(exc).splitlines()[0]}; "
                                   "retry, or generate without a draft") from exc


__all__ = ["DecodeBatch", "DecoderEndpoint", "stop_matched"]
