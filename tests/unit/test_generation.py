"""Decoder generation over in-process ranks (eager backend): matches transformers, speculative is exact."""

import pytest
import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from cluster.errors import InputError
from cluster.generation import DecoderLayout, generate, stream_generate
from cluster.models.llama import trace_llama

LAYOUT = DecoderLayout(batch_buckets=(1, 4), prompt_buckets=(8, 16), cache_buckets=(32, 64), verify_tokens=5)
PROMPTS = [[5, 9, 17, 3, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [40, 41], [7] * 15]


def _save(tmp_path, name, seed, **shape):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=None, **shape)
    model = HFLlama(config).eval()
    model.save_pretrained(tmp_path / name)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    hf = _save(root, "target", 0, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    _save(root, "draft", 1, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)
    target = trace_llama(root / "target", tp_degree=2, layout=LAYOUT, backend="eager", progress=False)
    draft = trace_llama(root / "draft", tp_degree=2, layout=DecoderLayout((1, 4), (8, 16), (32, 64)), backend="eager", progress=False)
    yield hf, target, draft, root
    target.close()
    draft.close()


def _hf_greedy(hf, prompt, new):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_tp2_greedy_equals_transformers_for_a_batch_of_lengths(pair):
    hf, target, _, _ = pair
    out = generate(target, PROMPTS[:3], max_new_tokens=30)  # 12 + 30 tokens: crosses cache bucket 32 -> 64
    assert out.sequences == [_hf_greedy(hf, p, 30) for p in PROMPTS[:3]]
    assert out.finish_reasons == ["length"] * 3


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_greedy_speculative_equals_target_only(pair, rows, k):
    _, target, draft, _ = pair
    prompts = PROMPTS[:rows]
    plain = generate(target, prompts, max_new_tokens=24)
    spec = generate(target, prompts, max_new_tokens=24, draft_model=draft, speculation_length=k)
    assert spec.sequences == plain.sequences
    assert spec.stats["proposed"] > 0 and 0 <= spec.stats["acceptance_rate"] <= 1


def test_sampling_is_seeded_and_streaming_yields_steps(pair):
    _, target, draft, _ = pair
    a = generate(target, PROMPTS[:2], max_new_tokens=12, temperature=0.8, top_k=20, seed=7)
    b = generate(target, PROMPTS[:2], max_new_tokens=12, temperature=0.8, top_k=20, seed=7)
    assert a.sequences == b.sequences
    spec = generate(target, PROMPTS[:2], max_new_tokens=12, temperature=0.8, seed=3, draft_model=draft)
    assert all(len(s) == 12 for s in spec.sequences)
    stream = stream_generate(target, PROMPTS[:1], max_new_tokens=5)
    steps = [step[0] for step in stream]
    assert len(steps) == 5 and sum(steps, []) == stream.output.sequences[0]


def test_eos_and_stop_sequences(pair):
    _, target, _, _ = pair
    full = generate(target, PROMPTS[:1], max_new_tokens=10).sequences[0]
    eos = full[3]
    cut = generate(target, PROMPTS[:1], max_new_tokens=10, eos_token_id=eos)
    assert cut.sequences[0] == full[: full.index(eos) + 1] and cut.finish_reasons == ["eos"]
    stop = generate(target, PROMPTS[:1], max_new_tokens=10, stop_sequences=[full[4:6]])
    assert stop.sequences[0] == full[:4] and stop.finish_reasons == ["stop"]


def test_bad_requests_are_refused_and_the_model_keeps_serving(pair):
    hf, target, draft, root = pair
    with pytest.raises(InputError, match="at least one token"):
        generate(target, [[]], max_new_tokens=4)
    with pytest.raises(InputError, match="above the largest context bucket 16"):
        generate(target, [list(range(1, 18))], max_new_tokens=4)
    with pytest.raises(InputError, match="does not fit the KV cache"):
        generate(target, PROMPTS[:1], max_new_tokens=60)
    for k in (0, 5):
        with pytest.raises(InputError, match="speculation_length must be 1..4"):
            generate(target, PROMPTS[:1], max_new_tokens=4, draft_model=draft, speculation_length=k)
    assert generate(target, PROMPTS[:1], max_new_tokens=8).sequences[0] == _hf_greedy(hf, PROMPTS[0], 8)


def test_a_draft_with_another_vocabulary_is_refused(pair, tmp_path):
    _, target, _, _ = pair
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=False)
    HFLlama(config).save_pretrained(tmp_path / "small-vocab")
    with trace_llama(tmp_path / "small-vocab", tp_degree=2, layout=DecoderLayout((1, 4), (8, 16), (32, 64)),
                     backend="eager", progress=False) as odd:
        with pytest.raises(InputError, match="vocabulary of 96.*must share a tokenizer and vocabulary"):
            generate(target, PROMPTS[:1], max_new_tokens=4, draft_model=odd)


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
    from cluster.generation.engine import GenerationRequest
    from cluster.generation.sampling import SamplingParams

    _, target, draft, _ = pair
    sampled = SamplingParams(temperature=0.9, top_k=30, seed=11)
    plan = [
        (0, GenerationRequest((tuple(PROMPTS[0]),), 20), False),
        (3, GenerationRequest((tuple(PROMPTS[1]),), 9, sampled), False),  # joins at step 3, leaves early
        (5, GenerationRequest((tuple(PROMPTS[2]), tuple(PROMPTS[3])), 16, speculation_length=3), True),
        (14, GenerationRequest((tuple(PROMPTS[3]),), 6), False),  # takes the slot the second one freed
    ]
    together = _run_sessions(target._coordinator, plan, draft._coordinator)
    alone = [_run_sessions(target._coordinator, [(0, request, drafted)], draft._coordinator)[0]
             for _, request, drafted in plan]
    assert together == alone
    assert together[0] == [generate(target, PROMPTS[:1], max_new_tokens=20).sequences[0]]
    assert [len(row) for row in together[1]] == [9]


def test_a_full_cache_refuses_new_sessions_until_one_closes(pair):
    from cluster.errors import Overloaded
    from cluster.generation.engine import GenerationRequest

    _, target, _, _ = pair
    coordinator = target._coordinator
    first = coordinator.generate_open(GenerationRequest(tuple(map(tuple, PROMPTS[:3])), 4))
    second = coordinator.generate_open(GenerationRequest((tuple(PROMPTS[3]),), 4))
    with pytest.raises(Overloaded, match="slots"):
        coordinator.generate_open(GenerationRequest((tuple(PROMPTS[0]),), 4))
    coordinator.generate_close(first)
    third = coordinator.generate_open(GenerationRequest((tuple(PROMPTS[0]),), 4))
    for session in (second, third):
        coordinator.generate_close(session)


def test_generate_batch_admits_steps_and_closes_finished_sessions(pair):
    from cluster.generation.engine import GenerationRequest

    _, target, _, _ = pair
    coordinator = target.coordinator
    requests = [GenerationRequest((tuple(PROMPTS[0]),), 3), GenerationRequest((tuple(PROMPTS[1]),), 5),
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
    assert summaries[first].finish == ["length"]
    assert got[first] == generate(target, PROMPTS[:1], max_new_tokens=3).sequences[0]
    assert coordinator.generate_batch(sessions=[first, second]).steps == {}  # both closed when they finished


def test_generate_batch_resync_closes_sessions_the_caller_lost_track_of(pair):
    from cluster.generation.engine import GenerationRequest

    _, target, _, _ = pair
    coordinator = target.coordinator
    kept, lost = coordinator.generate_batch([(GenerationRequest((tuple(PROMPTS[0]),), 30), None),
                                             (GenerationRequest((tuple(PROMPTS[1]),), 30), None)]).opened
    # e.g. a gateway restarted, or a round that timed out: the caller holds only `kept`
    round_ = coordinator.generate_batch(sessions=[kept], resync=True)
    assert lost in round_.summaries and set(round_.steps) == {kept}
    assert set(coordinator.generate_batch(closes=[kept]).summaries) == {kept}
    assert coordinator.generate_batch(sessions=[kept, lost]).steps == {}
