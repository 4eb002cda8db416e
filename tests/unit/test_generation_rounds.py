"""Generation rounds over in-process ranks (eager backend): a lost draft, adaptive rows' draft
prefill, resumed sequences, multi-step rounds and n-gram proposals; each gives the tokens plain
rounds give."""

import pytest

from cluster.errors import InputError
from cluster.generation import generate
from tests.support import TINY_LAYOUT, TINY_PROMPTS, hf_greedy


class _LosingDraft:
    """A draft model's coordinator whose ranks are lost after `rounds` proposal rounds
    (`prefills` prefills), as a kill -9 of a draft rank would show to the target's loop."""

    def __init__(self, coordinator, rounds=10**6, prefills=10**6):
        self.inner, self.rounds, self.prefills = coordinator, rounds, prefills
        self.calls = {"DraftPlan": 0, "Forward": 0}

    def info(self):
        return self.inner.info()

    def _lost(self, method, limit):
        self.calls[method] += 1
        if self.calls[method] > limit:
            from cluster.errors import RankFailure

            raise RankFailure(1, f"the draft's rank process died during {method}")

    def run(self, call):
        kind = type(call).__name__  # Forward: a prefill; DraftPlan: a round's proposals
        self._lost(kind, self.prefills if kind == "Forward" else self.rounds)
        return self.inner.run(call)


@pytest.mark.parametrize("lost_at", ["DraftPlan", "Forward"])
def test_a_lost_draft_costs_no_token_and_speculation_goes_on_target_only(pair, lost_at):
    from cluster.generation.types import GenerationRequest

    _, target, draft, _ = pair
    coordinator = target.coordinator
    losing = _LosingDraft(draft.coordinator, rounds=2) if lost_at == "DraftPlan" else _LosingDraft(draft.coordinator, prefills=0)
    speculating = GenerationRequest((tuple(TINY_PROMPTS[0]), tuple(TINY_PROMPTS[2])), 14, speculation_length=3)
    plain = GenerationRequest((tuple(TINY_PROMPTS[1]),), 14)
    sessions = [coordinator.generate_open(speculating, losing), coordinator.generate_open(plain)]
    got = {s: [[] for _ in range(2)] for s in sessions}
    steps = 0
    while True:
        results = {s: coordinator.generate_step(s) for s in sessions}
        for session, result in results.items():
            for row, tokens in enumerate(result.tokens):
                got[session][row] += tokens
        steps += 1
        if all(result.done for result in results.values()):
            break
        assert steps < 40, "the generation did not finish after its draft was lost"
    summary, other = (coordinator.generate_close(s) for s in sessions)
    expected = generate(target, [TINY_PROMPTS[0], TINY_PROMPTS[2], TINY_PROMPTS[1]], max_new_tokens=14).sequences
    assert got[sessions[0]] == expected[:2] and got[sessions[1]][0] == expected[2]  # greedy: as if undisturbed
    assert summary.finish == ["length", "length"] and summary.generated == expected[:2]
    stats = summary.speculation
    assert stats.draft_lost and other.speculation.target_only_steps == 0
    if lost_at == "DraftPlan":  # two verify rounds of 2 rows x 3 proposals, then target-only
        assert losing.calls["DraftPlan"] == 3 and (stats.proposed, stats.steps) == (12, 4)
    else:  # lost at the prefill: never proposed anything, every decode round target-only
        assert losing.calls == {"DraftPlan": 0, "Forward": 1} and stats.proposed == 0
        assert stats.target_only_steps == 2 * 13


def test_an_adaptive_rows_draft_is_prefilled_only_when_a_round_speculates(pair, monkeypatch):
    """Adaptive rows skip the draft's prefill at admission: a batch whose rounds never speculate
    never calls the draft; rounds that start speculating after plain ones first prefill the draft
    for all their rows in one call (their caches were empty), then propose; greedy output is the
    target's throughout."""
    from cluster.generation import policy
    from cluster.generation.types import GenerationRequest

    _, target, draft, _ = pair
    coordinator = target.coordinator
    expected = generate(target, TINY_PROMPTS[:2], max_new_tokens=16).sequences
    choices = iter([])
    monkeypatch.setattr(policy, "explore", lambda *a, **k: next(choices, 2))  # what each adaptive round picks
    monkeypatch.setattr(policy.SpeculationPolicy, "_lost_below", lambda self, batch: False)  # whatever earlier tests measured

    def run(picks):
        nonlocal choices
        choices = iter(picks)
        counting = _LosingDraft(draft.coordinator)
        session = coordinator.generate_open(GenerationRequest(tuple(map(tuple, TINY_PROMPTS[:2])), 16), counting)
        for _ in range(40):
            if coordinator.generate_step(session).done:
                break
        return coordinator.generate_close(session), counting.calls

    summary, calls = run([0] * 40)
    assert summary.generated == expected and summary.speculation.proposed == 0
    assert calls == {"DraftPlan": 0, "Forward": 0}
    monkeypatch.setattr(policy.SpeculationPolicy, "MAX_DECODE_STEPS", 1)  # so the rows still fit the draft's prompt bucket (16)
    summary, calls = run([0, 0, 0])  # three plain rounds, then k = 2 from the fourth on
    assert summary.generated == expected and summary.speculation.proposed > 0
    assert calls["Forward"] == 1 and calls["DraftPlan"] >= 1


def test_a_resumed_sequence_continues_the_same_random_stream(pair):
    """A sequence carried on elsewhere (its prompt plus what it had generated, `resumed`) generates what it
    would have: each round's generator comes from the sequence's seed and length."""
    from cluster.generation.types import GenerationRequest, SamplingParams

    _, target, draft, _ = pair
    coordinator = target.coordinator

    def run(request, draft_model=None):
        """The generated tokens, and where each step's tokens ended (a stream hands tokens over by steps)."""
        session = coordinator.generate_open(request, draft_model)
        ends = []
        while not (step := coordinator.generate_step(session)).done:
            ends.append(ends[-1] + len(step.tokens[0]) if ends else len(step.tokens[0]))
        return coordinator.generate_close(session).generated[0], ends

    for k, with_draft in ((0, None), (2, draft.coordinator)):
        sampling = SamplingParams(temperature=0.9, seed=21)
        whole, ends = run(GenerationRequest((tuple(TINY_PROMPTS[0]),), 20, sampling, speculation_length=k), with_draft)
        for cut in (ends[0], ends[len(ends) // 2]):
            prompt = tuple(TINY_PROMPTS[0]) + tuple(whole[:cut])
            resumed = GenerationRequest((prompt,), 20, sampling, speculation_length=k, resumed=cut)
            assert run(resumed, with_draft)[0] == whole, (k, cut)
    with pytest.raises(InputError, match="resumed=20"):
        run(GenerationRequest((tuple(TINY_PROMPTS[0]) + tuple(whole),), 20, resumed=20))


def _count_decode_steps(monkeypatch) -> list[int]:
    """The steps of every multi-step call (DecodeSteps) the ranks run from now on."""
    from cluster.generation.plan import DecodeSteps
    from cluster.rank import RankWorker

    steps, real = [], RankWorker.run

    def counted(self, call):
        if self.rank == 0 and isinstance(call, DecodeSteps):
            steps.append(call.steps)
        return real(self, call)

    monkeypatch.setattr(RankWorker, "run", counted)
    return steps


def test_multi_step_rounds_make_what_one_step_rounds_make(pair, monkeypatch):
    """Plain rows decode several steps per call to the ranks (DecodeSteps); greedy and seeded sampled
    output, eos and max_new_tokens are what one-step rounds give."""
    from cluster.generation.policy import SpeculationPolicy

    hf, target, _, _ = pair
    calls = _count_decode_steps(monkeypatch)
    sampled = dict(max_new_tokens=20, temperature=0.9, top_k=30, seed=11)
    multi = generate(target, TINY_PROMPTS[:3], **sampled)
    greedy = generate(target, TINY_PROMPTS[:3], max_new_tokens=20)
    eos = greedy.sequences[0][len(TINY_PROMPTS[0]) + 6]  # a token greedy makes 7th for row 0: it ends row 0 there
    early = generate(target, TINY_PROMPTS[:3], max_new_tokens=20, eos_token_id=eos)
    assert calls and max(calls) > 1  # rounds did run several steps in one call
    assert greedy.sequences == [hf_greedy(hf, p, 20) for p in TINY_PROMPTS[:3]]
    monkeypatch.setattr(SpeculationPolicy, "MAX_DECODE_STEPS", 1)
    calls.clear()
    assert generate(target, TINY_PROMPTS[:3], **sampled).sequences == multi.sequences
    assert generate(target, TINY_PROMPTS[:3], max_new_tokens=20, eos_token_id=eos).sequences == early.sequences
    assert not calls
    assert early.finish_reasons[0] == "eos" and early.sequences[0][-1] == eos
    assert all(len(s) == 20 for s in multi.sequences)


def test_decode_steps_plan_rejects_what_it_cannot_run():
    from cluster.generation.plan import DecodeSteps
    from cluster.generation.types import SamplingParams

    ok = dict(tokens=(4, -1), starts=(3, 0), budgets=(2, 0), layout=TINY_LAYOUT, sampling=(SamplingParams(),) * 2,
              seeds=(1, 0), lengths=(4, 0), eos_ids=(-1, -1))
    assert DecodeSteps(**ok).steps == 2
    with pytest.raises(ValueError, match="every row"):
        DecodeSteps(**{**ok, "seeds": (1,)})
    with pytest.raises(ValueError, match="budget"):
        DecodeSteps(**{**ok, "budgets": (0, 3)})


def test_ngram_proposer_without_a_draft_model(pair):
    """draft_model="[ngram]": proposals from each row's own repeated n-grams, verified by the target:
    greedy output is target-only greedy, and repetitive prompts get proposals accepted."""
    from cluster.generation import NGRAM_DRAFT

    _, target, _, _ = pair
    prompts = [[5, 6, 7, 8, 9] * 3, [1, 2, 3, 1, 2, 3, 1, 2], TINY_PROMPTS[2]]
    plain = generate(target, prompts, max_new_tokens=24)
    for k in (0, 3):  # adaptive, pinned
        spec = generate(target, prompts, max_new_tokens=24, draft_model=NGRAM_DRAFT, speculation_length=k)
        assert spec.sequences == plain.sequences
    pinned = generate(target, prompts, max_new_tokens=24, draft_model=NGRAM_DRAFT, speculation_length=4)
    assert pinned.stats.draft_tokens_proposed > 0
    sampled = generate(target, prompts, max_new_tokens=16, draft_model=NGRAM_DRAFT, speculation_length=2,
                       temperature=0.8, seed=5)
    assert all(len(s) == 16 for s in sampled.sequences)


def test_ngram_rounds_without_a_match_decode_several_steps_in_one_call(pair, monkeypatch):
    from cluster.generation import NGRAM_DRAFT

    _, target, _, _ = pair
    steps = _count_decode_steps(monkeypatch)
    prompt = [[40, 41, 42, 43, 44, 45, 46, 47]]  # nothing repeats until the model repeats itself
    plain = generate(target, prompt, max_new_tokens=24)
    steps.clear()
    spec = generate(target, prompt, max_new_tokens=24, draft_model=NGRAM_DRAFT)  # adaptive k
    assert spec.sequences == plain.sequences and steps and max(steps) > 1  # no match: multi-step, not one step
    steps.clear()
    pinned = generate(target, prompt, max_new_tokens=24, draft_model=NGRAM_DRAFT, speculation_length=3)
    assert pinned.sequences == plain.sequences and not steps  # a pinned k looks for a match at every position


def test_ngram_lookup_index_agrees_with_the_plain_search():
    import random

    from cluster.generation.ngram import NgramIndex, propose

    assert propose([1, 2, 3, 9, 1, 2], 3) == [3, 9, 1]
    assert propose([1, 2, 3, 4], 2) == []
    assert propose([7, 1, 2, 8, 1, 2, 5, 1, 2], 1) == [5]  # the latest earlier occurrence
    rng = random.Random(0)
    for _ in range(200):
        index, tokens = NgramIndex(), []
        for _ in range(rng.randrange(1, 50)):
            tokens.append(rng.randrange(5))
            k = rng.randrange(0, 5)
            assert index.propose(tokens, k) == propose(tokens, k)


@pytest.fixture(scope="module")
def chunked(pair):
    """The pair's target traced again with extend graphs: prompts longer than 8 tokens prefill 8 a round."""
    from cluster.generation import DecoderLayout
    from cluster.models.llama import trace_llama

    hf, _, _, root = pair
    layout = DecoderLayout((1, 4), (8, 16), (32, 64), verify_tokens=5, chunk_tokens=8)
    model = trace_llama(root / "target", tp_degree=2, layout=layout, backend="eager", progress=False)
    yield hf, model
    model.close()


def test_a_prompt_longer_than_every_prompt_bucket_is_prefilled_in_chunks(chunked):
    hf, model = chunked
    long = [(7 * i + 3) % 90 + 1 for i in range(41)]  # 41 tokens: prompt buckets stop at 16; 6 chunks of 8
    assert generate(model, [long], max_new_tokens=20).sequences == [hf_greedy(hf, long, 20)]
    rows = [TINY_PROMPTS[0], long, TINY_PROMPTS[3]]  # 5 and 15 tokens (15 > 8: chunked too) beside it
    assert generate(model, rows, max_new_tokens=12).sequences == [hf_greedy(hf, p, 12) for p in rows]
    with pytest.raises(InputError, match="above the 62 tokens its cache holds"):
        generate(model, [[5] * 63], max_new_tokens=1)


def test_a_long_prompt_joining_running_streams_leaves_their_tokens_as_they_were(chunked):
    from cluster.generation.types import GenerationRequest

    hf, model = chunked
    coordinator = model.coordinator
    long = [(5 * i + 1) % 90 + 1 for i in range(30)]
    first = coordinator.generate_open(GenerationRequest((tuple(TINY_PROMPTS[1]),), 16))
    got = {first: []}
    for _ in range(3):
        got[first] += coordinator.generate_step(first).tokens[0]
    second = coordinator.generate_open(GenerationRequest((tuple(long),), 10))  # joins mid-stream, 4 chunks
    got[second] = []
    for _ in range(40):
        results = {s: coordinator.generate_step(s) for s in (first, second)}
        for session, result in results.items():
            got[session] += result.tokens[0]
        if all(result.done for result in results.values()):
            break
    for session in (first, second):
        coordinator.generate_close(session)
    assert got[first] == hf_greedy(hf, TINY_PROMPTS[1], 16)
    assert got[second] == hf_greedy(hf, long, 10)


def test_a_resumed_sequence_longer_than_every_prompt_bucket_goes_on_through_chunks(chunked):
    from cluster.generation.types import GenerationRequest

    hf, model = chunked
    whole = TINY_PROMPTS[3] + hf_greedy(hf, TINY_PROMPTS[3], 30)  # 15 prompt tokens + 30: a carried-on stream past the buckets
    cut = 20
    resumed = GenerationRequest((tuple(whole[: 15 + cut]),), 30, resumed=cut)
    session = model.coordinator.generate_open(resumed)
    tokens = []
    while not (step := model.coordinator.generate_step(session)).done:
        tokens += step.tokens[0]
    tokens += step.tokens[0]
    model.coordinator.generate_close(session)
    assert tokens == whole[15 + cut:]


def test_a_prompt_that_starts_like_a_kept_row_reuses_its_cache_and_generates_the_same(chunked):
    """Prefix reuse: the shared blocks are taken from a finished row (in place) or copied from a live
    one, only the rest is prefilled; greedy and seeded tokens are what the same prompt gives alone."""
    from cluster.generation.types import GenerationRequest, SamplingParams

    hf, model = chunked
    coordinator = model.coordinator
    system = [(11 * i + 2) % 90 + 1 for i in range(33)]  # 33 tokens: two whole blocks of 16 to share
    asks = [system + [5, 6, 7], system + [8, 9], system + [40, 41, 42, 43]]
    sampled = SamplingParams(temperature=0.9, seed=4)

    def run(prompt, sampling=SamplingParams()):
        session = coordinator.generate_open(GenerationRequest((tuple(prompt),), 12, sampling))
        while not coordinator.generate_step(session).done:
            pass
        summary = coordinator.generate_close(session)
        return summary.generated[0], summary.reused_tokens

    alone = run(asks[0], sampled)  # nothing held starts this way yet
    assert alone[1] == 0
    assert run(asks[0], sampled) == (alone[0], 32)  # the same request again: its own kept row, in place
    assert run(asks[1]) == (hf_greedy(hf, asks[1], 12), 32)
    first = coordinator.generate_open(GenerationRequest((tuple(asks[2]),), 12))
    second = coordinator.generate_open(GenerationRequest((tuple(asks[1]),), 12))  # the first holds the kept row: a copy
    while not all(coordinator.generate_step(s).done for s in (first, second)):
        pass
    summaries = [coordinator.generate_close(s) for s in (first, second)]
    assert [s.generated[0] for s in summaries] == [hf_greedy(hf, asks[2], 12), hf_greedy(hf, asks[1], 12)]
    assert [s.reused_tokens for s in summaries] == [32, 32]


def test_a_resumed_sequence_reuses_the_prefix_its_lost_replica_would_have_held(chunked):
    from cluster.generation.types import GenerationRequest

    hf, model = chunked
    prompt = [(13 * i + 7) % 90 + 1 for i in range(20)]
    whole = prompt + hf_greedy(hf, prompt, 24)
    assert generate(model, [prompt], max_new_tokens=24).sequences == [whole[20:]]  # its row is kept: 43 tokens
    resumed = GenerationRequest((tuple(whole[:33]),), 24, resumed=13)  # 33 tokens: the 32 it prefills are all held
    session = model.coordinator.generate_open(resumed)
    tokens = []
    while not (step := model.coordinator.generate_step(session)).done:
        tokens += step.tokens[0]
    tokens += step.tokens[0]
    assert model.coordinator.generate_close(session).reused_tokens == 16  # a token of the 32 is left to feed
    assert tokens == whole[33:]
