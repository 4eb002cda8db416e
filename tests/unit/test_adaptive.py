"""Adaptive speculation: the choice of k from costs and acceptance, on plain values and through the
speculation policy's public face (cluster.generation.policy)."""

import pytest
import torch

from cluster.generation.adaptive import (CATCH_UP_ROUNDS, RECHECK_BUDGET, CallCosts, SpeculatingRow, acceptance_estimate,
                                         catch_up_s, choose_k, expected_tokens, explore, rates, recheck_due, round_cost,
                                         round_plan_k)
from cluster.generation.engine import DecodeBatch
from cluster.generation.endpoint import DecoderEndpoint
from cluster.generation.layout import DecoderLayout
from cluster.generation.policy import SpeculationPolicy
from cluster.generation.sampling import make_generator
from cluster.generation.speculative import verify_draft
from cluster.generation.types import GenerationRequest
from tests.support import check_matches, draw, random_probs


def test_expected_tokens_is_the_geometric_run_plus_the_targets_token():
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_acceptance_estimate_starts_at_the_prior_and_follows_the_row():
    assert acceptance_estimate(0, 0, prior=0.6) == pytest.approx(0.6)
    assert acceptance_estimate(90, 100, prior=0.6) == pytest.approx((90 + 8 * 0.6) / 108)
    assert acceptance_estimate(90, 100, prior=0.6) > acceptance_estimate(9, 10, prior=0.6) > 0.6


def test_a_cheap_draft_the_target_agrees_with_speculates_deep():
    rows = [SpeculatingRow(acceptance=0.9, pinned=0, cap=6)]
    assert choose_k(rows, 0, decode_s=10e-3, verify_s=11e-3, draft_step_s=0.5e-3) == 6


def test_an_expensive_draft_or_a_busy_batch_decodes_plainly():
    agreeing = [SpeculatingRow(acceptance=0.6, pinned=0, cap=6)]
    assert choose_k(agreeing, 0, decode_s=10e-3, verify_s=11e-3, draft_step_s=8e-3) == 0
    busy = [SpeculatingRow(acceptance=0.6, pinned=0, cap=6)] * 16
    assert choose_k(busy, 0, decode_s=20e-3, verify_s=90e-3, draft_step_s=6e-3) == 0


def test_the_choice_is_the_best_rate_among_all_k():
    rows = [SpeculatingRow(acceptance=0.7, pinned=0, cap=6), SpeculatingRow(acceptance=0.4, pinned=0, cap=3)]
    decode_s, verify_s, step_s = 10e-3, 12e-3, 2e-3

    def rate(k):
        ks = round_plan_k(rows, k)
        tokens = sum(expected_tokens(r.acceptance, rk) for r, rk in zip(rows, ks))
        return tokens / (verify_s + max(ks) * step_s if max(ks) else decode_s)

    best = choose_k(rows, 0, decode_s, verify_s, step_s)
    assert rate(best) == max(rate(k) for k in range(7))
    assert round_plan_k(rows, 5) == [5, 3]


def test_pinned_rows_keep_their_k_and_a_lagging_draft_costs_its_catch_up_spread_over_rounds():
    rows = [SpeculatingRow(acceptance=0.5, pinned=4, cap=4), SpeculatingRow(acceptance=0.9, pinned=0, cap=6)]
    assert round_plan_k(rows, 0) == [4, 0]
    costs = dict(decode_s=10e-3, verify_s=11e-3, draft_step_s=1e-3)
    fresh = rates([SpeculatingRow(acceptance=0.8, pinned=0, cap=4, pending=1)], 0, **costs)
    lagging = rates([SpeculatingRow(acceptance=0.8, pinned=0, cap=4, pending=1 + CATCH_UP_ROUNDS)], 0, **costs)
    assert fresh[0] == lagging[0] == 1 / 10e-3
    assert lagging[4] == pytest.approx(expected_tokens(0.8, 4) / (11e-3 + (4 + 1) * 1e-3))  # one step's catch-up
    assert choose_k([SpeculatingRow(acceptance=0.8, pinned=0, cap=4, pending=200)], 0, **costs) == 0


def test_unmeasured_costs_are_measured_first_and_averages_move():
    assert explore(None, None, None, cap=6) == 2
    assert explore(None, 1.0, 1.0, cap=6) == 0
    assert explore(1.0, 1.0, None, cap=1) == 1
    assert explore(1.0, 1.0, 1.0, cap=6) is None
    costs = CallCosts(window=3)
    for seconds in (2.0, 90.0, 4.0):  # one call slowed by the machine does not move the estimate far
        costs.observe("decode", 4, seconds)
    assert costs.get("decode", 4) == 4.0 and costs.get("decode", 1) is None
    costs.observe("decode", 4, 3.0)
    costs.observe("decode", 4, 3.0)  # only the last three count
    assert costs.get("decode", 4) == 3.0


def _batch(verify_tokens=5):  # a batch whose models must not be called
    layout = DecoderLayout((1, 4), (8, 16), (32, 64), verify_tokens)
    never = lambda *a: pytest.fail("no model call expected")  # noqa: E731
    target = DecoderEndpoint(never, layout, 128, "target", "t")
    draft = DecoderEndpoint(never, DecoderLayout((1, 4), (8, 16), (32, 64)), 128, "draft", "d")
    return DecodeBatch(target), draft


def _policy(acceptance=0.6):
    policy = SpeculationPolicy()
    policy.use_draft("draft")
    policy.draft.acceptance = acceptance
    return policy


def _observe(policy, batch, **seconds):
    for kind, value in seconds.items():
        policy.observe(kind, batch, value)


def test_the_policy_picks_each_rounds_k_from_its_measured_costs():
    policy = _policy()
    adaptive, pinned = SpeculatingRow(0.9, pinned=0, cap=4), SpeculatingRow(0.9, pinned=2, cap=2)
    assert policy.choose([adaptive, pinned], 0, 4, 4) == 2  # nothing measured at batch bucket 4: speculation first
    _observe(policy, 4, decode=10e-3, verify=11e-3, draft_step=0.2e-3)
    assert policy.choose([adaptive, pinned], 0, 4, 4) == 4
    policy.draft.costs.set("draft_step", 4, 50e-3)  # the draft became expensive...
    assert policy.choose([adaptive, pinned], 0, 4, 4) == 2  # ...but the pinned row pays for two draft steps anyway
    assert policy.choose([adaptive], 0, 1, 1) == 2  # one row: batch bucket 1, not measured yet
    _observe(policy, 1, decode=10e-3, verify=11e-3, draft_step=50e-3)
    assert policy.choose([adaptive], 0, 1, 1) == 0  # alone, the adaptive row decodes plainly


def test_adaptive_and_pinned_k_check_the_targets_verification_bucket():
    from cluster.errors import InputError

    batch, draft = _batch(verify_tokens=0)
    with pytest.raises(InputError, match="without verification graphs"):
        batch.open(GenerationRequest(((1, 2, 3),), 8), draft)
    batch, draft = _batch()
    with pytest.raises(InputError, match=r"speculation_length must be 1..4 \(or 0: adaptive\)"):
        batch.open(GenerationRequest(((1, 2, 3),), 8, speculation_length=5), draft)


def test_sampling_stays_lossless_when_each_rounds_k_follows_the_history():
    """Rows pick k from their own last round (as adaptive rounds do from measured acceptance); the
    tokens they emit still follow the target at every position."""
    gen = torch.Generator().manual_seed(7)
    rows, vocab, length = 30_000, 5, 3
    p = random_probs((vocab,), gen, sharpness=1.5)  # the target's distribution at every position
    q = 0.5 * p + 0.5 * random_probs((vocab,), gen, sharpness=1.5)
    out = [[] for _ in range(rows)]
    last = [0] * rows
    verify_gen = make_generator(11)
    while True:
        live = [r for r in range(rows) if len(out[r]) < length]
        if not live:
            break
        for k in (1, 2, 3):
            group = [r for r in live if 1 + last[r] % 3 == k]
            if not group:
                continue
            n = len(group)
            proposals = draw(q.expand(n, k, vocab), gen)
            tokens, accepted = verify_draft(proposals, q.expand(n, k, vocab), p.expand(n, k + 1, vocab), verify_gen,
                                            greedy=False)
            for r, emitted, a in zip(group, tokens.tolist(), accepted.tolist()):
                out[r] += emitted[: a + 1]
                last[r] = a
    emitted = torch.tensor([row[:length] for row in out])
    for position in range(length):
        check_matches(emitted[:, position], p, tolerance=0.012)


def test_the_option_not_taken_is_run_again_when_it_comes_close():
    policy = _policy(acceptance=0.2)  # a draft that rarely agrees: speculating is a little slower than decoding
    row = SpeculatingRow(0.2, pinned=0, cap=4)
    costs = {"decode": 10e-3, "verify": 11e-3, "draft_step": 2e-3}

    def rounds(n):
        """n rounds, each measuring the calls it would make, as DecodeBatch.step does."""
        picked = []
        for _ in range(n):
            picked.append(policy.choose([row], 0, 1, 1))
            for kind in ("verify", "draft_step") if picked[-1] else ("decode",):
                policy.observe(kind, 1, costs[kind])
        return picked

    rounds(1)
    picked = rounds(2 * policy.RECHECK_ROUNDS)
    assert picked.count(0) >= len(picked) - 2 and any(picked)  # plain decoding, and speculation re-measured
    costs["draft_step"] = 50e-3  # far slower: once measured, never re-run
    rounds(policy.RECHECK_ROUNDS + 1)
    assert not any(rounds(2 * policy.RECHECK_ROUNDS))


def test_a_rounds_fixed_overhead_favours_fewer_longer_rounds():
    rows = [SpeculatingRow(acceptance=0.55, pinned=0, cap=6)]
    costs = dict(decode_s=8.7e-3, verify_s=10.3e-3, draft_step_s=4e-3)
    assert choose_k(rows, 0, **costs) == 0
    assert choose_k(rows, 0, **costs, overhead_s=8e-3) > 0  # every round pays it: tokens per round count more
    assert rates(rows, 0, **costs, overhead_s=8e-3)[0] == pytest.approx(1 / 16.7e-3)


def test_multi_step_rounds_and_a_draft_prefill_enter_the_costs():
    rows = [SpeculatingRow(acceptance=0.7, pinned=0, cap=4, pending=1)]
    costs = dict(decode_s=7.6e-3, verify_s=10.6e-3, draft_step_s=4e-3, overhead_s=3e-3)
    # plain rounds run five decode steps per call here: the round's overhead is paid once for five tokens
    assert rates(rows, 0, **costs, decode_steps=5)[0] == pytest.approx(1 / (7.6e-3 + 3e-3 / 5))
    assert choose_k(rows, 0, **costs) == 2 and choose_k(rows, 0, **costs, decode_steps=5) == 0
    # a draft 60 tokens behind (never prefilled) catches up by one prefill when stepping costs more
    assert catch_up_s(60, 4e-3) == pytest.approx(59 * 4e-3) and catch_up_s(60, 4e-3, 12e-3) == 12e-3
    assert catch_up_s(2, 4e-3, 12e-3) == 4e-3
    behind = [SpeculatingRow(acceptance=0.7, pinned=0, cap=4, pending=60)]
    assert rates(behind, 0, **costs, draft_prefill_s=12e-3)[2] == pytest.approx(
        expected_tokens(0.7, 2) / (10.6e-3 + 2 * 4e-3 + 12e-3 / CATCH_UP_ROUNDS + 3e-3))


def test_a_batch_size_is_not_measured_when_speculation_lost_at_a_smaller_one():
    policy = _policy()
    row = SpeculatingRow(0.6, pinned=0, cap=4)
    _observe(policy, 1, decode=10e-3, verify=11e-3, draft_step=50e-3)
    assert policy.choose([row], 0, 1, 1) == 0  # alone, a slow draft does not pay
    assert policy.choose([row] * 3, 0, 4, 4) == 0  # batch bucket 4: nothing measured, but speculation lost at 1
    policy.draft.costs.set("draft_step", 1, 0.1e-3)  # the draft got cheap: alone, it speculates again...
    assert policy.choose([row], 0, 1, 1) > 0
    assert policy.choose([row] * 3, 0, 4, 4) == 2  # ...and a bigger batch measures speculation before deciding


# What the shipped pair's calls cost at batch 1 on this CPU (TP=2 target, plain rounds of 5 decode steps),
# with the draft loaded as its own model (each step a call to its ranks) and with it fused into the target.
SEPARATE_DRAFT = dict(decode_s=12.7e-3, verify_s=20.7e-3, draft_step_s=12.8e-3, overhead_s=2.0e-3, decode_steps=5,
                      draft_prefill_s=42.7e-3)
FUSED_DRAFT = dict(SEPARATE_DRAFT, verify_s=10.5e-3, draft_step_s=2.2e-3)


def test_a_separate_draft_at_batch_one_decodes_plainly_where_the_same_draft_fused_speculates():
    for pending in (1, 2, 40):  # speculating, just after a full acceptance, and after plain rounds
        rows = [SpeculatingRow(acceptance=0.69, pinned=0, cap=6, pending=pending)]
        assert choose_k(rows, 0, **SEPARATE_DRAFT) == 0
        assert max(rates(rows, 0, **SEPARATE_DRAFT)[1:]) < 0.65 * rates(rows, 0, **SEPARATE_DRAFT)[0]
        assert choose_k(rows, 0, **FUSED_DRAFT) >= 2


def test_re_measuring_speculation_pays_its_whole_catch_up_within_the_budget():
    behind = [SpeculatingRow(acceptance=0.69, pinned=0, cap=6, pending=40)]
    costs = dict(SEPARATE_DRAFT, draft_prefill_s=165e-3)  # a draft prefill over 40 tokens (its 128-token bucket)
    plain = round_cost(behind, 0, 0, **costs)
    assert plain == pytest.approx((5.0, 5 * 12.7e-3 + 2.0e-3))
    again = round_cost(behind, 0, 1, **costs, catch_up_rounds=1)
    assert again[1] == pytest.approx(20.7e-3 + 12.8e-3 + 165e-3 + 2.0e-3)  # the round that re-measures pays it all
    lost = again[1] - again[0] * plain[1] / plain[0]
    assert not any(recheck_due(n * SpeculationPolicy.RECHECK_ROUNDS, plain, again) for n in (1, 2))
    rounds = int(lost / (RECHECK_BUDGET * plain[1])) + 1
    assert recheck_due(rounds, plain, again) and not recheck_due(rounds - 1, plain, again)
    caught_up = [SpeculatingRow(acceptance=0.69, pinned=0, cap=6, pending=1)]
    assert recheck_due(SpeculationPolicy.RECHECK_ROUNDS, plain, round_cost(caught_up, 0, 1, **costs, catch_up_rounds=1))


def test_the_policy_chooses_plain_decoding_where_a_separate_draft_loses():
    """Measured costs of a separate draft at batch 1 (each proposal a call to its own ranks): the
    policy never speculates, once its calls are measured, however many rounds run."""
    policy = _policy(acceptance=0.69)
    row = SpeculatingRow(0.69, pinned=0, cap=6)
    costs = {"decode": SEPARATE_DRAFT["decode_s"], "verify": SEPARATE_DRAFT["verify_s"],
             "draft_step": SEPARATE_DRAFT["draft_step_s"]}
    picked = []
    for _ in range(200):
        picked.append(policy.choose([row], 0, 1, 1, decode_steps=5))
        for kind in ("verify", "draft_step") if picked[-1] else ("decode",):
            policy.observe(kind, 1, costs[kind])
    assert picked[0] > 0 and not any(picked[2:])  # measured once, then plain decoding throughout


def test_each_draft_is_judged_on_its_own_calls_and_a_graphs_first_run_is_not_a_cost():
    policy = _policy(acceptance=0.69)
    row = SpeculatingRow(0.69, pinned=0, cap=6)
    for kind, seconds in (("decode", 12.7e-3), ("verify", 10.5e-3), ("draft_step", 2.2e-3)):
        policy.observe(kind, 1, 1.0, graph=0)  # the first run of a graph deserializes it on the ranks: not counted
        policy.observe(kind, 1, seconds, graph=0)
    assert policy.cost("verify", 1) == 10.5e-3 and policy.choose([row], 0, 1, 1) > 0
    policy.use_draft("separate")  # the fused draft's steps say nothing of this one's: measured first
    assert policy.cost("draft_step", 1) is None and policy.cost("decode", 1) == 12.7e-3
    assert policy.choose([row], 0, 1, 1) == 2
    for kind, seconds in (("verify", 1.0), ("verify", 20.7e-3), ("draft_step", 1.0), ("draft_step", 12.8e-3)):
        policy.observe(kind, 1, seconds, graph=0)
    assert policy.choose([row], 0, 1, 1) == 0
    policy.use_draft("draft")  # and back: the first draft's own costs and acceptance
    assert policy.cost("draft_step", 1) == 2.2e-3 and policy.draft.acceptance == 0.69
    assert policy.choose([row], 0, 1, 1) > 0


def test_plain_rounds_of_a_streamed_row_run_few_steps_in_one_call():
    policy = _policy()
    assert policy.decode_steps(1) == 1  # a step is measured first
    policy.observe("decode", 1, 4e-3)
    assert policy.decode_steps(1) == policy.MAX_DECODE_STEPS  # 64 ms hold 16 steps of 4 ms: at most 8
    assert policy.decode_steps(1, streamed=True) == policy.STREAM_STEPS  # its tokens reach the client a round at a time
    policy.observe("decode", 4, 40e-3)
    assert policy.decode_steps(4) == policy.decode_steps(4, streamed=True) == 1
