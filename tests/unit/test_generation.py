"""Decoder generation over in-process ranks (eager backend): matches transformers, speculative is exact."""

import pytest
import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from cluster.errors import InputError
from cluster.generation import DecoderLayout, generate, stream_generate
from cluster.models.llama import trace_llama
from tests.support import TINY_PROMPTS, hf_greedy


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
