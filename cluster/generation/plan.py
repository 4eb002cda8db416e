"""What one generation round does, decided once from the sequences' state: a pure plan step.

`plan_round(rows, decode_steps)` reads each sequence's `RowState` (its cache slot, its tokens, how
many of them each model has cached, this round's speculation length, whether its draft cache is
caught up first) and returns a `RoundPlan`: which rows are prefilled, whether the running rows
decode (and how many steps in one call) or run a draft/verify round, which draft caches a prefill
catches up first, and what every row feeds the target and the draft. The decisions it takes as
input (k per row, the steps a plain call may run, the rows to catch up) are the speculation
policy's and the proposer's (cluster.generation.policy, cluster.generation.proposers). `DecodeBatch.step` (cluster.generation.engine) executes the
plan on the models and applies the results; the split follows vLLM's `schedule()` /
`update_from_output()`. No torch here, and no model: the rules are tested on plain values.

The rules:
- a row that has not been prefilled is prefilled (its whole prompt); every other live row runs;
- a `chunked` row (a prompt longer than the chunk size) is prefilled `chunk_tokens` tokens a round
  instead, from what its cache holds, in one `extend` call with the other chunked rows: no round
  waits on more than one chunk of any prompt;
- a round of plain rows runs `decode_steps` steps in one call, one while rows wait to be prefilled
  (a new row joins at the next round, not after several steps);
- one running row that speculates (k > 0) makes the round a verify round for every running row:
  rows with k = 0 ride along in the same verify forward with their one token;
- a speculating row marked `catch_up` has its draft cache refilled first, by one draft prefill of
  all its tokens but the last, which the round feeds;
- the draft runs k_max = the largest k of the running rows proposals for every speculating row;
- finished rows take no part.

The calls a round makes to a model's ranks are values too: `Forward` (one bucket graph),
`DraftPlan` (a draft's proposals), `DecodeSteps` (several decode steps) and `FusedRound` (a fused
draft/verify round). Each goes down one verb, `run(call)`, through the coordinator and its rank
group to every rank, which runs it with `cluster.generation.steps.execute`: a new kind of call is
a new plan type here and one rank-side function there. `DraftPlan`'s docstring is the feeding
contract between this package and `cluster.generation.steps.draft_loop`; `draft_tokens_kept` is
the rule the update step derives from it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar, Union

if TYPE_CHECKING:  # types only: the plan itself needs no torch
    from cluster.generation.layout import DecoderLayout
    from cluster.generation.types import SamplingParams

T = TypeVar("T")

DECODE = "decode"
VERIFY = "verify"


@dataclass(frozen=True)
class RowState:
    """What the plan reads of one sequence.

    tokens: prompt + generated so far; cached / draft_cached: how many of them the target's /
    the draft's KV-cache row holds; k: draft proposals per round (0: no speculation).
    """

    slot: int
    tokens: tuple[int, ...]
    k: int = 0
    started: bool = False
    finished: bool = False
    cached: int = 0
    draft_cached: int = 0
    catch_up: bool = False
    chunked: bool = False

    @property
    def draft_fed(self) -> int:
        """Tokens of the row in its draft cache when its draft proposes: after the catch-up, if any."""
        return len(self.tokens) - 1 if self.catch_up else self.draft_cached


@dataclass(frozen=True)
class Feed:
    """One model call's rows, indexed by cache slot up to the highest slot in the call.

    tokens[slot] is fed from position starts[slot]; -1 feeds nothing (it goes to the scratch
    slot), so a slot that takes no part in the call is (-1, ...) and its cache row is untouched.
    """

    tokens: tuple[tuple[int, ...], ...]
    starts: tuple[int, ...]

    @property
    def width(self) -> int:
        """Cache rows the call spans: its batch size before bucketing."""
        return len(self.tokens)


@dataclass(frozen=True)
class RoundPlan:
    """One round: a prefill of the new rows, and a decode or verify step of the running rows.

    prompts / draft_prompts: the prefill's rows for the target / the draft, by slot (None: not
    prefilled); the draft prefills only the new rows that speculate, and `draft_prompts` is ()
    when there are none. target: each running row's one uncached token (in a verify round each
    speculating row's `proposals[slot]` draft tokens follow it). decode_steps: a decode round's
    steps in one call. catch_up: the draft prefill before a verify round, by slot (None: not caught
    up), () when none. draft (verify rounds): each speculating row's pending tokens, right-aligned
    as `DraftPlan` wants them. chunks: the chunked rows' next chunk of their prompt, fed from what
    their cache holds (None: no chunked row).
    """

    prefill: tuple[int, ...] = ()
    prompts: tuple[tuple[int, ...] | None, ...] = ()
    draft_prompts: tuple[tuple[int, ...] | None, ...] = ()
    step: str = ""  # DECODE, VERIFY, or "" when no row is running
    running: tuple[int, ...] = ()
    target: Feed | None = None
    proposals: tuple[int, ...] = ()
    k_max: int = 0
    draft: Feed | None = None
    decode_steps: int = 1
    catch_up: tuple[tuple[int, ...] | None, ...] = ()
    chunks: Feed | None = None


def _by_slot(rows: Sequence[RowState], value: Callable[[RowState], T], empty: T) -> tuple[T, ...]:
    """value(row) at each row's slot, `empty` at the slots in between, up to the highest slot."""
    out = [empty] * (max(r.slot for r in rows) + 1)
    for row in rows:
        out[row.slot] = value(row)
    return tuple(out)


def plan_round(rows: Sequence[RowState], decode_steps: int = 1, chunk_tokens: int = 0) -> RoundPlan:
    """The round the live rows take next (see the module docstring for the rules)."""
    live = [r for r in rows if not r.finished]
    new = [r for r in live if not r.started]
    running = [r for r in live if r.started]
    plan = RoundPlan()
    whole = [r for r in new if not r.chunked]
    if whole:
        drafted = [r for r in whole if r.k]
        plan = replace(plan, prefill=tuple(r.slot for r in whole), prompts=_by_slot(whole, lambda r: r.tokens, None),
                       draft_prompts=_by_slot(drafted, lambda r: r.tokens, None) if drafted else ())
    chunking = [r for r in new if r.chunked]
    if chunking:
        if chunk_tokens < 1:
            raise ValueError("chunked rows need chunk_tokens")
        plan = replace(plan, chunks=Feed(_by_slot(chunking, lambda r: r.tokens[r.cached : r.cached + chunk_tokens], (-1,)),
                                         _by_slot(chunking, lambda r: r.cached, 0)))
    if not running:
        return plan
    # One uncached token per running row: the one the last round emitted.
    target = Feed(_by_slot(running, lambda r: r.tokens[r.cached:], (-1,)), _by_slot(running, lambda r: r.cached, 0))
    plan = replace(plan, step=DECODE, running=tuple(r.slot for r in running), target=target)
    speculating = [r for r in running if r.k]
    if not speculating:
        return replace(plan, decode_steps=1 if new else max(1, decode_steps))
    lagging = [r for r in speculating if r.catch_up]
    pending = _by_slot(speculating, lambda r: r.tokens[r.draft_fed:], (-1,))
    longest = max(map(len, pending))
    draft = Feed(tuple((-1,) * (longest - len(p)) + p for p in pending),  # right-aligned: see DraftPlan
                 _by_slot(speculating, lambda r: r.draft_fed, 0))
    return replace(plan, step=VERIFY, proposals=_by_slot(running, lambda r: r.k, 0),
                   k_max=max(r.k for r in speculating), draft=draft,
                   catch_up=_by_slot(lagging, lambda r: r.tokens[:-1], None) if lagging else ())


@dataclass(frozen=True)
class Forward:
    """One bucket graph's call on every rank, with inputs already shaped for bucket `bucket`; rank 0
    returns the graph's outputs. `draft`: the fused draft's graphs (the whole draft every rank holds
    beside its shard, cluster.trace.fused) rather than the model's own."""

    bucket: int
    inputs: tuple[Any, ...]
    draft: bool = False


@dataclass(frozen=True)
class DraftPlan:
    """One call on the draft's ranks: `steps` proposals per row in one round trip.

    The feeding contract (`cluster.generation.steps.draft_loop` implements it; `draft_tokens_kept`
    relies on it):

    1. Row r feeds pending[r] one token per decode call from position starts[r]. Rows are
       right-aligned (left-padded with -1, which feeds nothing), so every row feeds its last
       pending token in the same call, number len(pending[0]) - 1; that call's logits give the
       first proposal. A row that is all -1 is idle: it feeds and keeps nothing.
    2. Each proposal is then fed back to draw the next: `steps` proposals take
       len(pending[0]) + steps - 1 decode calls, and the last proposal is never fed.
    3. Row r samples under sampling[r] with a generator seeded by seeds[r]; every rank draws the
       same tokens from the same logits and seeds. Rank 0 returns (tokens [B, steps], the draft's
       probabilities [B, steps, V] when want_probs, else None).

    So the round leaves in row r's draft cache its pending tokens and its first steps - 1
    proposals; when the target accepts a of the proposals, the cache stays valid up to
    `draft_tokens_kept(pending[r], a, steps)` tokens past starts[r].
    """

    pending: tuple[tuple[int, ...], ...]
    starts: tuple[int, ...]
    steps: int
    layout: DecoderLayout
    sampling: tuple[SamplingParams, ...]
    seeds: tuple[int, ...]
    want_probs: bool = False

    def __post_init__(self) -> None:
        rows = len(self.pending)
        if not rows or self.steps < 1 or len({len(p) for p in self.pending}) != 1:
            raise ValueError("DraftPlan needs at least one row, steps >= 1, and pending rows of one length")
        if not len(self.starts) == len(self.sampling) == len(self.seeds) == rows:
            raise ValueError("DraftPlan needs starts, sampling and seeds for every pending row")


@dataclass(frozen=True)
class FusedRound:
    """One fused speculation round on the target's ranks (`cluster.generation.steps.fused_round`): the
    draft call `draft` on each rank's copy of the draft, then the target's verify forward, where row
    (slot) r feeds tokens[r] followed by its first proposals[r] proposals from starts[r]."""

    draft: DraftPlan
    tokens: tuple[tuple[int, ...], ...]
    starts: tuple[int, ...]
    proposals: tuple[int, ...]
    layout: DecoderLayout

    def __post_init__(self) -> None:
        if not len(self.tokens) == len(self.starts) == len(self.proposals):
            raise ValueError("FusedRound needs tokens, starts and proposals for every row")
        if any(k > self.draft.steps for k in self.proposals):
            raise ValueError(f"FusedRound: a row asks for more than the draft's {self.draft.steps} proposals")


@dataclass(frozen=True)
class DecodeSteps:
    """Several target decode steps in one call to its ranks (`cluster.generation.steps.decode_steps`):
    the decode round of plain (non-speculating) rows, run `steps` times with each token fed back.

    Row (slot) r feeds tokens[r] from position starts[r] (-1: the row is idle) and makes up to
    budgets[r] tokens: the i-th under sampling[r] with `position_generator(seeds[r], lengths[r] + i)`,
    the generator a one-token round of a sequence of that length draws from, so what a row makes
    does not depend on how many steps a call runs. A row stops early at its eos_ids[r] (-1: none).
    Each token but a row's last is fed back, so a row that made n tokens gains n cache entries (its
    fed token and n - 1 of the made ones) and its last one is the next round's feed, as after n
    one-step rounds. Rank 0 returns the tokens [B, steps], -1 past each row's last.
    """

    tokens: tuple[int, ...]
    starts: tuple[int, ...]
    budgets: tuple[int, ...]
    layout: DecoderLayout
    sampling: tuple[SamplingParams, ...]
    seeds: tuple[int, ...]
    lengths: tuple[int, ...]
    eos_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        fields = (self.starts, self.budgets, self.sampling, self.seeds, self.lengths, self.eos_ids)
        if not self.tokens or any(len(f) != len(self.tokens) for f in fields):
            raise ValueError("DecodeSteps needs tokens, starts, budgets, sampling, seeds, lengths and eos_ids for every row")
        if any(b < 0 for b in self.budgets) or not any(b > 0 for t, b in zip(self.tokens, self.budgets) if t >= 0):
            raise ValueError("DecodeSteps needs a row with a token to feed and a budget of at least 1")

    @property
    def steps(self) -> int:
        return max(self.budgets)


@dataclass(frozen=True)
class CopyRows:
    """Copy KV-cache rows on every rank (prefix reuse, cluster.generation.prefix): for each (source
    slot, target slot, length), the first `length` positions of the source row of every state
    tensor (io_aliases: the KV caches) into the target row, in order. `position_dim`: the caches'
    position dimension (cluster.models.llama: [batch, kv heads, position, head dim])."""

    copies: tuple[tuple[int, int, int], ...]
    position_dim: int = 2


# What `run(call)` takes, on every layer from the coordinator down to the rank.
Call = Union[Forward, DraftPlan, DecodeSteps, FusedRound, CopyRows]


def draft_tokens_kept(pending: Sequence[int], accepted: int, steps: int) -> int:
    """How many tokens a row's draft cache gains in a round where the target accepted `accepted`
    of its proposals: its pending tokens, and the accepted proposals the draft fed back (only
    the first steps - 1 are; see DraftPlan). The next round feeds the draft from there."""
    return sum(1 for t in pending if t >= 0) + min(accepted, steps - 1)


__all__ = ["DECODE", "VERIFY", "Call", "CopyRows", "DecodeSteps", "DraftPlan", "Feed", "Forward", "FusedRound", "RoundPlan", "RowState", "draft_tokens_kept", "plan_round"]
