"""Decoder generation over in-process ranks (eager backend): matches transformers, speculative is exact."""

import pytest
import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from cluster.errors import InputError
from cluster.generation import DecoderLayout, generate, stream_generate
from cluster.models.llama import trace_llama
from tests.support import TINY_DRAFT, TINY_LAYOUT, TINY_PROMPTS, TINY_TARGET, TINY_VOCAB, hf_greedy, save_random_llama


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    hf = save_random_llama(root / "target", 0, TINY_VOCAB, **TINY_TARGET)
    save_random_llama(root / "draft", 1, TINY_VOCAB, **TINY_DRAFT)
    target = trace_llama(root / "target", tp_degree=2, layout=TINY_LAYOUT, backend="eager", progress=False)
    draft = trace_llama(root / "draft", tp_degree=2, layout=DecoderLayout((1, 4), (8, 16), (32, 64)), backend="eager", progress=False)
    yield hf, target, draft, root
    target.close()
    draft.close()


def test_tp2_greedy_equals_transformers_for_a_batch_of_lengths(pair):
    hf, target, _, _ = pair
    out = generate(target, TINY_PROMPTS[:3], max_new_tokens=30)  # 12 + 30 tokens: crosses cache bucket 32 -> 64
    assert out.sequences == [hf_greedy(hf, p, 30) for p in TINY_PROMPTS[:3]]
    assert out.finish_reasons == ["length"] * 3


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_greedy_speculative_equals_target_only(pair, rows, k):
    _, target, draft, _ = pair
    prompts = TINY_PROMPTS[:rows]
    plain = generate(target, prompts, max_new_tokens=24)
    spec = generate(target, prompts, max_new_tokens=24, draft_model=draft, speculation_length=k)
    assert spec.sequences == plain.sequences
    assert spec.stats.draft_tokens_proposed > 0 and spec.stats.acceptance_rate == spec.stats.draft_tokens_accepted / spec.stats.draft_tokens_proposed


@pytest.mark.parametrize("rows", [1, 4])
def test_adaptive_speculation_equals_target_only(pair, rows):
    """speculation_length left at 0: each round picks its k (0 included); greedy output is the target's."""
    _, target, draft, _ = pair
    prompts = TINY_PROMPTS[:rows]
    plain = generate(target, prompts, max_new_tokens=24)
    adaptive = generate(target, prompts, max_new_tokens=24, draft_model=draft)
    assert adaptive.sequences == plain.sequences


def test_sampling_is_seeded_and_streaming_yields_steps(pair):
    _, target, draft, _ = pair
    a = generate(target, TINY_PROMPTS[:2], max_new_tokens=12, temperature=0.8, top_k=20, seed=7)
    b = generate(target, TINY_PROMPTS[:2], max_new_tokens=12, temperature=0.8, top_k=20, seed=7)
    assert a.sequences == b.sequences
    spec = generate(target, TINY_PROMPTS[:2], max_new_tokens=12, temperature=0.8, seed=3, draft_model=draft)
    assert all(len(s) == 12 for s in spec.sequences)
    stream = stream_generate(target, TINY_PROMPTS[:1], max_new_tokens=5)
    steps = [step[0] for step in stream]
    # multi-step decoding hands over several tokens per round: every step has some, none is lost
    assert 1 < len(steps) <= 5 and all(steps) and sum(steps, []) == stream.output.sequences[0]


def test_eos_and_stop_sequences(pair):
    _, target, _, _ = pair
    full = generate(target, TINY_PROMPTS[:1], max_new_tokens=10).sequences[0]
    eos = full[3]
    cut = generate(target, TINY_PROMPTS[:1], max_new_tokens=10, eos_token_id=eos)
    assert cut.sequences[0] == full[: full.index(eos) + 1] and cut.finish_reasons == ["eos"]
    stop = generate(target, TINY_PROMPTS[:1], max_new_tokens=10, stop_sequences=[full[4:6]])
    assert stop.sequences[0] == full[:4] and stop.finish_reasons == ["stop"]


def _driver_stops(steps, stops):
    """What the driver did before the engine matched stop sequences: (yielded steps, output)."""
    generated, yielded = [], []
    for tokens in steps:
        kept = []
        for token in tokens:
            generated.append(token)
            kept.append(token)
            stop = next((s for s in stops if generated[-len(s):] == s), None)
            if stop is not None:
                del generated[-len(stop):]
                yielded.append(kept[: max(0, len(kept) - len(stop))])
                return yielded, generated
        yielded.append(kept)
    return yielded, generated


@pytest.mark.parametrize("drafted", [False, True])
def test_stop_sequences_within_and_across_steps_match_what_the_driver_did(pair, drafted):
    _, target, draft, _ = pair
    kwargs = dict(max_new_tokens=16, **({"draft_model": draft, "speculation_length": 3} if drafted else {}))
    steps = list(stream_generate(target, TINY_PROMPTS[1:2], **kwargs))
    full = [token for step in steps for token in step[0]]
    for start, length in [(0, 1), (3, 2), (5, 3), (len(full) - 2, 2)]:
        stop = full[start : start + length]
        stream = stream_generate(target, TINY_PROMPTS[1:2], stop_sequences=[[999], stop], **kwargs)
        got = [s[0] for s in stream]
        yielded, output = _driver_stops([s[0] for s in steps], [[999], stop])
        # the tokens handed out, not how rounds bunch them (multi-step rounds follow the measured step cost)
        assert (sum(got, []), stream.output.sequences[0]) == (sum(yielded, []), output)
        assert full[: len(output) + length] == output + stop  # cut at the stop's first occurrence
        assert stream.output.finish_reasons == ["stop"]


def test_a_stopped_row_finishes_while_its_neighbours_go_on(pair):
    _, target, _, _ = pair
    full = generate(target, TINY_PROMPTS[:2], max_new_tokens=8).sequences
    cut = generate(target, TINY_PROMPTS[:2], max_new_tokens=8, stop_sequences=[full[0][2:4]])
    assert cut.sequences[0] == full[0][:2] and cut.finish_reasons[0] == "stop"
    if full[0][2:4] not in [full[1][i : i + 2] for i in range(7)]:
        assert cut.sequences[1] == full[1] and cut.finish_reasons[1] == "length"


def test_sequence_emit_finishes_on_stop_then_eos_then_length():
    from cluster.generation.sequence import LiveSequence
    from cluster.generation.types import GenerationRequest

    def row(**kw):
        return LiveSequence(0, 1, [1, 2], 2, GenerationRequest(((1, 2),), **kw), 0, 0)

    seq = row(max_new_tokens=5, stop_sequences=((2, 7),))
    seq.emit([7])  # the stop may not reach into the prompt
    assert (seq.finish, seq.outbox) == ("", [7])
    seq.outbox = []  # taken
    seq.emit([2, 7, 9])
    assert (seq.finish, seq.sequence, seq.outbox) == ("stop", [1, 2, 7], [])
    seq = row(max_new_tokens=3, eos_token_id=7, stop_sequences=((3, 7),))
    seq.emit([3, 7])  # the eos completes a stop sequence: stop wins, both go
    assert (seq.finish, seq.sequence[2:]) == ("stop", [])
    seq = row(max_new_tokens=3, eos_token_id=7)
    seq.emit([4, 7, 5])
    assert (seq.finish, seq.outbox) == ("eos", [4, 7])
    seq = row(max_new_tokens=2, stop_sequences=((5, 6),))
    seq.emit([5, 6])  # the stop completes at the length limit: stop wins
    assert (seq.finish, seq.outbox) == ("stop", [])


def test_bad_requests_are_refused_and_the_model_keeps_serving(pair):
    hf, target, draft, root = pair
    with pytest.raises(InputError, match="at least one token"):
        generate(target, [[]], max_new_tokens=4)
    with pytest.raises(InputError, match="above the largest context bucket 16"):
        generate(target, [list(range(1, 18))], max_new_tokens=4)
    with pytest.raises(InputError, match="does not fit the KV cache"):
        generate(target, TINY_PROMPTS[:1], max_new_tokens=60)
    for k in (-1, 5):
        with pytest.raises(InputError, match="speculation_length must be 1..4"):
            generate(target, TINY_PROMPTS[:1], max_new_tokens=4, draft_model=draft, speculation_length=k)
    with pytest.raises(InputError, match="stop sequences"):
        generate(target, TINY_PROMPTS[:1], max_new_tokens=4, stop_sequences=[[-3]])
    assert generate(target, TINY_PROMPTS[:1], max_new_tokens=8).sequences[0] == hf_greedy(hf, TINY_PROMPTS[0], 8)


def test_a_draft_with_another_vocabulary_is_refused(pair, tmp_path):
    _, target, _, _ = pair
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=False)
    HFLlama(config).save_pretrained(tmp_path / "small-vocab")
    with trace_llama(tmp_path / "small-vocab", tp_degree=2, layout=DecoderLayout((1, 4), (8, 16), (32, 64)),
                     backend="eager", progress=False) as odd:
        with pytest.raises(InputError, match="vocabulary of 96.*must share a tokenizer and vocabulary"):
            generate(target, TINY_PROMPTS[:1], max_new_tokens=4, draft_model=odd)


# -- continuous batching: sessions share the cache slots and the steps -------------------------

def _run_sessions(coordinator, plan, draft=None):
    """plan: (step at which to open, GenerationRequest, use draft); returns each session's tokens.

    Sessions join while others are mid-generation and are closed as soon as they finish.
    """
    done, running, step = {}, {}, 0
    while len(done) < len(plan):
        for index, (at, request, drafted) in enumerate(plan):
            if at == step:
                running[index] = (coordinator.generate_open(request, draft if drafted else None), [[] for _ in request.prompts])
        for index, (session, got) in list(running.items()):
            result = coordinator.generate_step(session)
            for row, new in enumerate(result.tokens):
                got[row] += new
            if result.done:
                coordinator.generate_close(session)
                done[index] = running.pop(index)[1]
        step += 1
    return [done[i] for i in range(len(plan))]


def test_sessions_joining_mid_generation_get_the_tokens_they_get_alone(pair):
    from cluster.generation.types import GenerationRequest, SamplingParams

    _, target, draft, _ = pair
    sampled = SamplingParams(temperature=0.9, top_k=30, seed=11)
    plan = [
        (0, GenerationRequest((tuple(TINY_PROMPTS[0]),), 20), False),
        (3, GenerationRequest((tuple(TINY_PROMPTS[1]),), 9, sampled), False),  # joins at step 3, leaves early
        (5, GenerationRequest((tuple(TINY_PROMPTS[2]), tuple(TINY_PROMPTS[3])), 16, speculation_length=3), True),
        (14, GenerationRequest((tuple(TINY_PROMPTS[3]),), 6), False),  # takes the slot the second one freed
    ]
    together = _run_sessions(target.coordinator, plan, draft.coordinator)
    alone = [_run_sessions(target.coordinator, [(0, request, drafted)], draft.coordinator)[0]
             for _, request, drafted in plan]
    assert together == alone
    assert together[0] == [generate(target, TINY_PROMPTS[:1], max_new_tokens=20).sequences[0]]
    assert [len(row) for row in together[1]] == [9]


def test_a_full_cache_refuses_new_sessions_until_one_closes(pair):
    from cluster.errors import Overloaded
    from cluster.generation.types import GenerationRequest

    _, target, _, _ = pair
    coordinator = target.coordinator
    first = coordinator.generate_open(GenerationRequest(tuple(map(tuple, TINY_PROMPTS[:3])), 4))
    second = coordinator.generate_open(GenerationRequest((tuple(TINY_PROMPTS[3]),), 4))
    with pytest.raises(Overloaded, match="slots"):
        coordinator.generate_open(GenerationRequest((tuple(TINY_PROMPTS[0]),), 4))
    coordinator.generate_close(first)
    third = coordinator.generate_open(GenerationRequest((tuple(TINY_PROMPTS[0]),), 4))
    for session in (second, third):
        coordinator.generate_close(session)


def test_generate_batch_admits_steps_and_closes_finished_sessions(pair):
    from cluster.generation.types import GenerationRequest, SessionSummary

    _, target, _, _ = pair
    coordinator = target.coordinator
    requests = [GenerationRequest((tuple(TINY_PROMPTS[0]),), 3), GenerationRequest((tuple(TINY_PROMPTS[1]),), 5),
                GenerationRequest((), 3)]
    round_ = coordinator.generate_batch([(r, None) for r in requests])
    first, second, refused = round_.opened
    assert isinstance(refused, InputError) and "non-empty" in str(refused)
    got = {first: list(round_.steps[first].tokens[0]), second: list(round_.steps[second].tokens[0])}
    summaries = {}
    while len(summaries) < 2:
        round_ = coordinator.generate_batch(sessions=[s for s in (first, second) if s not in summaries])
        for session, step in round_.steps.items():
            got[session] += step.tokens[0]
        summaries.update(round_.summaries)
    assert [len(got[first]), len(got[second])] == [3, 5]
    assert isinstance(summaries[first], SessionSummary) and summaries[first].finish == ["length"]
    assert summaries[first].generated == [got[first]] and summaries[first].prompt_lengths == [len(TINY_PROMPTS[0])]
    assert summaries[first].speculation.proposed == 0
    assert got[first] == generate(target, TINY_PROMPTS[:1], max_new_tokens=3).sequences[0]
    assert coordinator.generate_batch().steps == {}


def test_generate_batch_resync_closes_sessions_a_server_lost_track_of(pair):
    from cluster.generation.types import GenerationRequest

    _, target, _, _ = pair
    coordinator = target.coordinator
    kept, lost = coordinator.generate_batch([(GenerationRequest((tuple(TINY_PROMPTS[0]),), 30), None),
                                             (GenerationRequest((tuple(TINY_PROMPTS[1]),), 30), None)]).opened
    round_ = coordinator.generate_batch(sessions=[kept], resync=True)  # e.g. a gateway restarted, or a round that timed out
    assert lost in round_.summaries and set(round_.steps) == {kept}
    assert round_.summaries[lost].finish == [""]  # closed before it finished
    coordinator.generate_batch(closes=[kept])
    assert coordinator.generate_batch().steps == {}


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
