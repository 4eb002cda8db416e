"""Adaptive speculation: the choice of k from costs and acceptance, on plain values; the engine's use of it."""

import pytest
import torch

from cluster.generation.adaptive import (CATCH_UP_ROUNDS, CallCosts, SpeculatingRow, acceptance_estimate, catch_up_s, choose_k,
                                         expected_tokens, explore, rates, round_plan_k)
from cluster.generation.engine import DecodeBatch, DecoderEndpoint
from cluster.generation.layout import DecoderLayout
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


def _batch(verify_tokens=5):
    layout = DecoderLayout((1, 4), (8, 16), (32, 64), verify_tokens)
    never = lambda *a: pytest.fail("no model call expected")  # noqa: E731
    target = DecoderEndpoint(never, layout, 128, "target", "t")
    draft = DecoderEndpoint(never, DecoderLayout((1, 4), (8, 16), (32, 64)), 128, "draft", "d")
    return DecodeBatch(target), draft


def test_the_batch_picks_each_rounds_k_from_its_measured_costs():
    batch, draft = _batch()
    batch.open(GenerationRequest(((1, 2, 3),), 8), draft)  # speculation_length 0: adaptive, up to 4
    batch.open(GenerationRequest(((4, 5),), 8, speculation_length=2), draft)  # pinned
    rows = list(batch.slots.values())
    assert [(r.adaptive, r.k) for r in rows] == [(True, 4), (False, 2)]
    for row in rows:
        row.started, row.cached, row.draft_cached = True, len(row.sequence) - 1, len(row.sequence) - 1
    batch._choose_round_k()  # nothing measured at batch bucket 4: speculation is measured first
    assert [r.round_k for r in rows] == [2, 2]
    batch.costs.observe("decode", 4, 10e-3)
    batch.costs.observe("verify", 4, 11e-3)
    batch.costs.observe("draft_step", 4, 0.2e-3)
    batch.acceptance = 0.9
    batch._choose_round_k()
    assert [r.round_k for r in rows] == [4, 2]
    batch.costs.set("draft_step", 4, 50e-3)  # the draft became expensive...
    batch._choose_round_k()
    assert [r.round_k for r in rows] == [2, 2]  # ...but the pinned row pays for two draft steps anyway
    batch.close(2)
    batch._choose_round_k()
    assert rows[0].round_k == 2  # one row: batch bucket 1, not measured yet
    for kind, seconds in (("decode", 10e-3), ("verify", 11e-3), ("draft_step", 50e-3)):
        batch.costs.observe(kind, 1, seconds)
    batch._choose_round_k()
    assert rows[0].round_k == 0  # alone, the adaptive row decodes plainly


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
    batch, draft = _batch()
    batch.open(GenerationRequest(((1, 2, 3),), 8), draft)
    row = next(iter(batch.slots.values()))
    row.started, row.cached, row.draft_cached = True, 2, 2
    batch.acceptance = 0.2  # a draft that rarely agrees: speculating is a little slower than decoding
    costs = {"decode": 10e-3, "verify": 11e-3, "draft_step": 2e-3}

    def rounds(n):
        """n rounds, each measuring the calls it would make, as DecodeBatch.step does."""
        picked = []
        for _ in range(n):
            batch._choose_round_k()
            picked.append(row.round_k)
            for kind in ("verify", "draft_step") if row.round_k else ("decode",):
                batch.costs.observe(kind, 1, costs[kind])
        return picked

    rounds(1)
    picked = rounds(2 * batch.RECHECK_ROUNDS)
    assert picked.count(0) >= len(picked) - 2 and any(picked)  # plain decoding, and speculation re-measured
    costs["draft_step"] = 50e-3  # far slower: once measured, never re-run
    rounds(batch.RECHECK_ROUNDS + 1)
    assert not any(rounds(2 * batch.RECHECK_ROUNDS))


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
    batch, draft = _batch()
    batch.open(GenerationRequest(((1, 2, 3),), 8), draft)
    first = next(iter(batch.slots.values()))
    first.started, first.cached = True, 2
    for kind, seconds in (("decode", 10e-3), ("verify", 11e-3), ("draft_step", 50e-3)):
        batch.costs.observe(kind, 1, seconds)
    batch._choose_round_k()
    assert first.round_k == 0  # alone, a slow draft does not pay
    for prompt in ((4, 5), (6, 7, 8)):
        batch.open(GenerationRequest((prompt,), 8), draft)
    for row in batch.slots.values():
        row.started, row.cached = True, len(row.sequence) - 1
    batch._choose_round_k()  # batch bucket 4: nothing measured, but speculation lost at 1
    assert [row.round_k for row in batch.slots.values()] == [0, 0, 0]
    batch.costs.set("draft_step", 1, 0.1e-3)  # the draft got cheap: alone, it speculates again...
    batch.close(2)
    batch.close(3)
    batch._choose_round_k()
    assert first.round_k > 0
    for session in (4, 5):  # ...and a bigger batch measures speculation before deciding
        batch.open(GenerationRequest(((9, 9),), 8), draft)
    for row in batch.slots.values():
        row.started, row.cached = True, len(row.sequence) - 1
    batch._choose_round_k()
    assert [row.round_k for row in batch.slots.values()] == [2, 2, 2]
