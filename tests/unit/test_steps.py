"""The loops a rank runs inside one call (cluster.generation.steps), over a fake `run`: a "model"
whose next token is always the fed one plus one. No rank, no graphs."""

import torch

from cluster.generation.plan import DecodeSteps, DraftPlan
from cluster.generation.steps import decode_steps, draft_loop
from cluster.generation.types import SamplingParams
from tests.support import TINY_LAYOUT, TINY_VOCAB


class _Successor:
    """run(bucket, inputs): logits that pick (fed token + 1) for every row; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.fed: list[list[int]] = []

    def __call__(self, bucket, inputs):
        self.calls += 1
        ids = inputs[0][:, -1]
        self.fed.append(ids.tolist())
        logits = torch.full((ids.shape[0], 1, TINY_VOCAB), -1e9)
        logits[torch.arange(ids.shape[0]), 0, (ids + 1) % TINY_VOCAB] = 0.0
        return (logits,)


def test_decode_steps_keeps_each_rows_budget_and_eos():
    run = _Successor()
    plan = DecodeSteps(tokens=(5, 9), starts=(4, 2), budgets=(3, 4), layout=TINY_LAYOUT,
                       sampling=(SamplingParams(), SamplingParams()), seeds=(0, 0), lengths=(5, 3), eos_ids=(-1, 11))
    made = decode_steps(run, plan)
    assert made.tolist() == [[6, 7, 8], [10, 11, -1]]  # row 1 stops at its eos, row 0 at its budget
    assert run.calls == 3


def test_draft_loop_feeds_pending_tokens_then_proposes():
    run = _Successor()
    plan = DraftPlan(pending=((3, 4),), starts=(2,), steps=3, layout=TINY_LAYOUT, sampling=(SamplingParams(),),
                     seeds=(0,), want_probs=False)
    tokens, probs = draft_loop(run, plan)
    assert tokens.tolist() == [[5, 6, 7]] and probs is None
    assert run.calls == 2 + 3 - 1  # the pending tokens, then each proposal but the last fed back
