"""The plan step of a generation round: pure rules over the sequences' state, no model."""

import pytest

from cluster.generation.plan import DECODE, VERIFY, DraftPlan, Feed, RoundPlan, RowState, draft_tokens_kept, plan_round


def running(slot, tokens, k=0, cached=None, draft_cached=None):
    """A row that was prefilled: every token but the last is in the target's cache."""
    cached = len(tokens) - 1 if cached is None else cached
    return RowState(slot, tuple(tokens), k, started=True, cached=cached,
                    draft_cached=cached if draft_cached is None else draft_cached)


def test_nothing_live_plans_nothing():
    assert plan_round([]) == RoundPlan()
    assert plan_round([RowState(0, (1, 2), finished=True)]) == RoundPlan()


def test_new_rows_prefill_while_running_ones_decode():
    rows = [running(0, [5, 6, 7]), RowState(1, (9, 9)), running(2, [1, 2, 3, 4]), RowState(3, (8,))]
    plan = plan_round(rows)
    assert plan.prefill == (1, 3)
    assert plan.prompts == (None, (9, 9), None, (8,))  # other slots' rows go to the scratch slot
    assert plan.draft_prompts == ()  # nobody speculates: no draft prefill
    assert plan.step == DECODE and plan.running == (0, 2)
    assert plan.target == Feed(((7,), (-1,), (4,)), (2, 0, 3))  # each running row's one uncached token
    assert plan.target.width == 3 and plan.k_max == 0 and plan.draft is None


def test_only_new_speculating_rows_are_prefilled_on_the_draft():
    plan = plan_round([RowState(0, (1, 2), k=0), RowState(2, (3, 4, 5), k=3)])
    assert plan.prefill == (0, 2) and plan.step == ""
    assert plan.prompts == ((1, 2), None, (3, 4, 5))
    assert plan.draft_prompts == (None, None, (3, 4, 5))


def test_one_speculating_row_makes_a_verify_round_and_plain_rows_ride_along():
    rows = [running(0, [5, 6, 7]), running(1, [1, 2, 3], k=2), running(3, [4, 4], k=4)]
    plan = plan_round(rows)
    assert plan.step == VERIFY and plan.running == (0, 1, 3)
    assert plan.target.tokens == ((7,), (3,), (-1,), (4,))  # one token each; proposals follow where k > 0
    assert plan.proposals == (0, 2, 0, 4)  # row 0 rides along with its one token, slot 2 is empty
    assert plan.k_max == 4  # the draft runs the largest k for every speculating row


def test_widths_span_the_highest_slot_in_each_call():
    plan = plan_round([running(0, [1, 2], k=2), running(5, [3, 4]), RowState(2, (7,))])
    assert plan.target.width == 6  # running slots 0 and 5
    assert plan.draft.width == 1  # only slot 0 speculates
    assert len(plan.prompts) == 3  # the prefill spans slot 2


def test_finished_rows_take_no_part():
    finished = RowState(1, (1, 2, 3), k=2, started=True, finished=True, cached=2, draft_cached=2)
    plan = plan_round([running(0, [5, 6]), finished, RowState(2, (9,), finished=True)])
    assert plan.step == DECODE and plan.running == (0,) and plan.prefill == ()
    assert plan_round([finished]) == RoundPlan()


def test_draft_pending_is_right_aligned_with_its_starts():
    # slot 0's draft is 3 tokens behind (all its proposals were accepted), slot 1's one.
    rows = [running(0, [1, 2, 3, 4, 5, 6], k=3, draft_cached=3), running(1, [7, 8, 9], k=3)]
    plan = plan_round(rows)
    assert plan.draft == Feed(((4, 5, 6), (-1, -1, 9)), (3, 2))


def test_plain_rounds_run_their_steps_in_one_call_unless_a_row_waits_to_be_prefilled():
    rows = [running(0, [5, 6, 7]), running(1, [1, 2])]
    assert plan_round(rows, decode_steps=5).decode_steps == 5
    assert plan_round(rows + [RowState(2, (9, 9))], decode_steps=5).decode_steps == 1  # it joins at the next round
    assert plan_round([running(0, [5, 6, 7], k=2)], decode_steps=5).step == VERIFY


def test_a_lagging_draft_is_caught_up_by_a_prefill_before_it_proposes():
    # row 0's draft holds 2 of its 6 tokens, row 2's none (never prefilled): both are caught up to all but
    # the last token, which the round feeds; row 1's draft is current
    rows = [RowState(0, (1, 2, 3, 4, 5, 6), 2, True, cached=5, draft_cached=2, catch_up=True),
            running(1, [7, 8, 9], k=2), RowState(2, (3, 3, 3), 2, True, cached=2, draft_cached=0, catch_up=True)]
    plan = plan_round(rows)
    assert plan.catch_up == ((1, 2, 3, 4, 5), None, (3, 3))
    assert plan.draft == Feed(((6,), (9,), (3,)), (5, 2, 2))  # one pending token each, from the caught-up length
    assert plan_round([RowState(0, (1, 2, 3), 0, True, cached=2, catch_up=True)]).catch_up == ()  # it does not speculate


def test_draft_tokens_kept_counts_pending_and_the_fed_back_accepted_proposals():
    # the draft feeds its pending tokens and its first steps - 1 proposals (DraftPlan's contract)
    assert [draft_tokens_kept((9,), a, 3) for a in range(4)] == [1, 2, 3, 3]
    assert draft_tokens_kept((-1, -1, 9), 1, 3) == 2  # padding is not a token
    assert draft_tokens_kept((4, 5), 0, 1) == 2  # k = 1: the one proposal is never fed


# Rejected proposals were never valid; accepted ones the draft fed back are already cached. Only
# when all k are accepted is the last proposal (never fed) pending next to the target's token.
@pytest.mark.parametrize("accepted, next_pending", [(0, (20,)), (1, (20,)), (2, (20,)), (3, (13, 20))])
def test_the_draft_feed_after_partial_acceptance(accepted, next_pending):
    """Pin the round-to-round rule: after a round, the draft is fed from what it kept."""
    prompt = (1, 2, 3, 4)
    row = running(0, [*prompt, 10], k=3, cached=4, draft_cached=4)  # after prefill: one emitted token
    plan = plan_round([row])
    assert plan.draft.tokens == ((10,),) and plan.draft.starts == (4,) and plan.k_max == 3
    # the draft proposed 11, 12, 13; the target accepted `accepted` of them and added 20
    emitted = [11, 12, 13][:accepted] + [20]
    after = RowState(0, (*prompt, 10, *emitted), 3, started=True, cached=row.cached + 1 + accepted,
                     draft_cached=row.draft_cached + draft_tokens_kept(plan.draft.tokens[0], accepted, plan.k_max))
    following = plan_round([after])
    assert following.draft.tokens == (next_pending,)
    assert following.draft.starts == (len(prompt) + 1 + len(emitted) - len(next_pending),)
    assert following.target.tokens == ((20,),)  # the target always has exactly one token to catch up


def test_a_draft_plan_checks_its_rows():
    with pytest.raises(ValueError, match="one length"):
        DraftPlan(((1,), (-1, 2)), (0, 0), 2, None, (None, None), (0, 0))
    with pytest.raises(ValueError, match="every pending row"):
        DraftPlan(((1,), (2,)), (0,), 2, None, (None, None), (0, 0))
    with pytest.raises(ValueError, match="steps >= 1"):
        DraftPlan(((1,),), (0,), 0, None, (None,), (0,))


def test_chunked_rows_feed_their_next_chunk_from_what_their_cache_holds():
    long = tuple(range(1, 21))  # 20 tokens in chunks of 8: 8 cached, the next chunk is 8 more
    rows = [running(0, [5, 6, 7]), RowState(1, long, k=2, cached=8, chunked=True), RowState(2, (9, 9), k=2)]
    plan = plan_round(rows, decode_steps=4, chunk_tokens=8)
    assert plan.chunks == Feed(((-1,), tuple(range(9, 17))), (0, 8))
    assert plan.prefill == (2,) and plan.draft_prompts == (None, None, (9, 9))  # a chunked row gets no draft prefill
    assert plan.step == DECODE and plan.decode_steps == 1  # rows wait to be prefilled: one step
    last = plan_round([RowState(0, long, cached=16, chunked=True)], chunk_tokens=8)
    assert last.chunks == Feed(((17, 18, 19, 20),), (16,)) and last.prefill == ()
    with pytest.raises(ValueError, match="chunk_tokens"):
        plan_round([RowState(0, long, chunked=True)])


def test_a_layout_with_chunks_has_extend_graphs_and_takes_prompts_up_to_its_cache():
    from cluster.generation.layout import DecoderLayout, step_inputs

    layout = DecoderLayout((1, 4), (8, 16), (32, 64), verify_tokens=5, chunk_tokens=8)
    assert [k for k in layout.kinds() if k[0] == "extend"] == [("extend", b, s) for b in (1, 4) for s in (32, 64)]
    assert layout.max_prompt == 62 and DecoderLayout((1,), (8, 16), (32, 64)).max_prompt == 16
    assert layout.chunked(9) and not layout.chunked(8)
    assert DecoderLayout.from_json(layout.to_json()) == layout
    assert DecoderLayout.from_json({k: v for k, v in layout.to_json().items() if k != "chunk_tokens"}).chunk_tokens == 0
    bucket, (ids, pos, mask, last) = step_inputs(layout, "extend", [[4, 5, 6], [-1]], [10, 0])
    assert layout.kinds()[bucket] == ("extend", 4, 32) and ids.shape == (4, 8)
    assert pos[0, :4].tolist() == [10, 11, 12, 63] and last[:, 0].tolist() == [2, 0, 0, 0]
    assert mask[0].tolist() == [1] * 13 + [0] * 19
    with pytest.raises(ValueError, match="chunk_tokens"):
        DecoderLayout((1,), (8,), (32,), chunk_tokens=32)
