"""What a rank runs for one call (`execute`), over its bucket graphs: one graph (`Forward`), several
decode steps of the target (`decode_steps`), a draft's proposals (`draft_loop`), and a fused
draft/verify round (`fused_round`).

Each is a function of the plan type that defines its contract (cluster.generation.plan) and of
`run(bucket, inputs) -> outputs`, the rank's graph call (its collectives inside), so the loops are
tested with a fake `run` and no rank; the rank (cluster.rank.RankWorker.run) binds them to its
graphs. Every rank runs the same loop on the same inputs and seeds, so every rank feeds the same
tokens. A new kind of call is a plan type and a function here: `execute` dispatches on the type.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

import torch

from cluster.generation.layout import step_inputs
from cluster.generation.plan import CopyRows, DecodeSteps, DraftPlan, Forward, FusedRound
from cluster.generation.sampling import make_generator, position_generator, probabilities, sample

if TYPE_CHECKING:
    from cluster.generation.plan import Call

Run = Callable[[int, tuple], Any]
GraphRun = Callable[[int, tuple, bool], Any]  # (bucket, inputs, the fused draft's graphs?) -> outputs


def execute(call: Call, run: GraphRun, gather: Callable[[torch.Tensor], torch.Tensor],
            states: Callable[[], dict[str, torch.Tensor]] = dict) -> Any:
    """One call on a rank: `run(bucket, inputs, draft)` is its graph call, `gather` makes rank 0's
    proposals every rank's (a fused round), `states` are its state tensors (the KV caches). What
    rank 0 returns to the caller."""
    own: Run = lambda bucket, inputs: run(bucket, inputs, False)  # noqa: E731
    if isinstance(call, Forward):
        return run(call.bucket, call.inputs, call.draft)
    if isinstance(call, DecodeSteps):
        return decode_steps(own, call)
    if isinstance(call, DraftPlan):
        return draft_loop(own, call)
    if isinstance(call, FusedRound):
        return fused_round(lambda bucket, inputs: run(bucket, inputs, True), own, gather, call)
    if isinstance(call, CopyRows):
        return copy_rows(states(), call)
    raise TypeError(f"a rank runs Forward, DecodeSteps, DraftPlan, FusedRound or CopyRows calls, not {type(call).__name__}")


def copy_rows(states: dict[str, torch.Tensor], call: CopyRows) -> None:
    """Each copy's first positions of the source row into the target row, in every state tensor."""
    dim = call.position_dim - 1  # of one row
    for tensor in states.values():
        if tensor.dim() <= call.position_dim:
            continue
        for source, target, length in call.copies:
            tensor[target].narrow(dim, 0, length).copy_(tensor[source].narrow(dim, 0, length))


def decode_steps(run: Run, plan: DecodeSteps) -> torch.Tensor:
    """Up to plan.steps decode steps of every row (multi-step decoding): each row makes at most its
    budget, stops at its eos, and samples from the generator of its position. The tokens [B, steps],
    -1 past each row's last."""
    rows = len(plan.tokens)
    feed, starts = list(plan.tokens), list(plan.starts)
    made: list[list[int]] = [[] for _ in range(rows)]
    for step in range(plan.steps):
        bucket, inputs = step_inputs(plan.layout, "decode", [[t] for t in feed], starts)
        logits = run(bucket, inputs)[0][:rows, 0]
        live = [r for r in range(rows) if feed[r] >= 0]
        greedy = logits.argmax(-1).tolist() if any(plan.sampling[r].greedy for r in live) else []
        starts = [s + (1 if t >= 0 else 0) for s, t in zip(starts, feed)]
        for r in live:
            params = plan.sampling[r]
            if params.greedy:
                token = greedy[r]
            else:
                generator = position_generator(plan.seeds[r], plan.lengths[r] + step)
                token = int(sample(probabilities(logits[r : r + 1].float(), params), generator)[0])
            made[r].append(token)
            done = len(made[r]) >= plan.budgets[r] or token == plan.eos_ids[r]
            feed[r] = -1 if done else token
        if all(t < 0 for t in feed):
            break
    width = max(map(len, made))
    return torch.tensor([m + [-1] * (width - len(m)) for m in made], dtype=torch.int64)


def draft_loop(run: Run, plan: DraftPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A draft's proposals in one call: feeds each row's pending tokens, then samples plan.steps
    tokens, each but the last fed back (the feeding contract in DraftPlan). (tokens [B, steps],
    probs [B, steps, V] or None)."""
    params, rows = plan.sampling, len(plan.starts)
    starts = list(plan.starts)
    generators = [make_generator(seed) for seed in plan.seeds]
    all_greedy = all(p.greedy for p in params)
    width = len(plan.pending[0])  # rows are right-aligned: all feed their last pending token at width - 1
    active = [any(t >= 0 for t in row) for row in plan.pending]  # idle rows keep writing to the scratch slot
    tokens, probs = [], []
    feed = [row[0] for row in plan.pending]
    for step in range(width + plan.steps - 1):  # the last proposal is never fed
        bucket, inputs = step_inputs(plan.layout, "decode", [[t] for t in feed], starts)
        logits = run(bucket, inputs)[0][:rows, 0].float()
        starts = [s + (1 if t >= 0 else 0) for s, t in zip(starts, feed)]
        if step >= width - 1:
            if all_greedy and not plan.want_probs:  # the argmax of the logits is the argmax of the probabilities
                picked = logits.argmax(-1)
            else:
                p = torch.cat([probabilities(logits[r : r + 1], params[r]) for r in range(rows)])
                picked = torch.stack([
                    p[r].argmax() if params[r].greedy else sample(p[r : r + 1], generators[r])[0] for r in range(rows)
                ])
                if plan.want_probs:
                    probs.append(p)
            tokens.append(picked)
            feed = [t if on else -1 for t, on in zip(picked.tolist(), active)]
        else:
            feed = [row[step + 1] for row in plan.pending]
    return torch.stack(tokens, 1), (torch.stack(probs, 1) if probs else None)


def fused_round(run_draft: Run, run_target: Run, gather: Callable[[torch.Tensor], torch.Tensor],
                plan: FusedRound) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, float]:
    """One fused round: the draft's proposals (`draft_loop` on `run_draft`), made the same on every
    rank by `gather` (rank 0's), then the target's verify forward over each row's fed token and its
    proposals. (proposals, draft probs or None, target logits [B, verify_tokens, V], seconds in the draft)."""
    started = time.perf_counter()
    proposals, probs = draft_loop(run_draft, plan.draft)
    proposals = gather(proposals)
    draft_s = time.perf_counter() - started
    fed = [list(tokens) + (proposals[slot, :k].tolist() if k else [])
           for slot, (tokens, k) in enumerate(zip(plan.tokens, plan.proposals))]
    bucket, inputs = step_inputs(plan.layout, "verify", fed, list(plan.starts))
    logits = run_target(bucket, inputs)[0][:, : plan.layout.verify_tokens]
    return proposals, probs, logits, draft_s


__all__ = ["copy_rows", "decode_steps", "draft_loop", "execute", "fused_round"]
