"""Decoders on real rank actors: TP=2 generation equals transformers; the speculative loop across two models."""

import pytest

from cluster.generation import DecoderLayout, generate
from cluster.models.llama import trace_llama
from tests.support import TINY_DRAFT, TINY_LAYOUT, TINY_PROMPTS, TINY_TARGET, TINY_VOCAB, hf_greedy, save_random_llama

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def models(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-ray")
    hf = save_random_llama(root / "target", 0, TINY_VOCAB, **TINY_TARGET)
    save_random_llama(root / "draft", 1, TINY_VOCAB, **TINY_DRAFT)
    target = trace_llama(root / "target", tp_degree=2, layout=TINY_LAYOUT, progress=False)
    draft = trace_llama(root / "draft", tp_degree=1, layout=DecoderLayout((1, 4), (8, 16), (32, 64)), progress=False)
    yield hf, target, draft, root
    target.close()
    draft.close()


def test_tp2_greedy_equals_transformers_through_both_cache_buckets(models):
    hf, target, _, _ = models
    out = generate(target, TINY_PROMPTS[:3], max_new_tokens=30)
    assert out.sequences == [hf_greedy(hf, p, 30) for p in TINY_PROMPTS[:3]]


def test_speculative_across_two_models_equals_target_only(models):
    _, target, draft, _ = models
    for rows in (1, 4):
        plain = generate(target, TINY_PROMPTS[:rows], max_new_tokens=20)
        spec = generate(target, TINY_PROMPTS[:rows], max_new_tokens=20, draft_model=draft, speculation_length=3)
        assert spec.sequences == plain.sequences
        assert spec.stats.draft_tokens_proposed > 0


def test_saved_decoder_loads_with_its_cache_state(models, tmp_path):
    import cluster

    hf, target, _, _ = models
    cluster.trace.parallel_model_save(target, tmp_path / "target")
    with cluster.trace.parallel_model_load(tmp_path / "target") as loaded:
        assert generate(loaded, TINY_PROMPTS[:2], max_new_tokens=10).sequences == [hf_greedy(hf, p, 10) for p in TINY_PROMPTS[:2]]


@pytest.mark.slow
def test_compiled_rank_graphs_on_rank_actors_generate_transformers_tokens(models, tmp_path):
    """TP=2 over real rank actors with the graphs compiled to machine code (cluster.trace.compiled):
    the collective custom op runs inside the compiled code; the tokens are transformers' still."""
    import cluster
    from cluster.generation.layout import prefill_inputs, step_inputs
    from cluster.trace.compiled import compiler_missing

    if compiler_missing():
        pytest.skip(compiler_missing())
    hf, target, _, _ = models
    cluster.trace.parallel_model_save(target, tmp_path / "target")
    prompt = TINY_PROMPTS[0]
    buckets = sorted({prefill_inputs(TINY_LAYOUT, [prompt])[0]}
                     | {step_inputs(TINY_LAYOUT, "decode", [[0]], [start])[0] for start in range(len(prompt), len(prompt) + 31)})
    with cluster.trace.parallel_model_load(tmp_path / "target") as loaded:
        done = loaded.coordinator.compile_graphs(buckets)
        assert [bucket for bucket, _, _ in done] == buckets and len(buckets) == 3  # a prefill, decodes at caches 32 and 64
        assert generate(loaded, [prompt], max_new_tokens=30).sequences == [hf_greedy(hf, prompt, 30)]


@pytest.mark.slow
def test_chunked_prefill_on_rank_actors_gives_transformers_tokens(models):
    """Prompts longer than every prompt bucket, prefilled 8 tokens a round through traced extend graphs
    (torch.export, TP=2 over rank actors), beside a short one prefilled whole."""
    hf, _, _, root = models
    layout = DecoderLayout((1, 4), (8, 16), (32, 64), chunk_tokens=8)
    long = [(7 * i + 3) % 90 + 1 for i in range(41)]
    with trace_llama(root / "target", tp_degree=2, layout=layout, progress=False) as model:
        rows = [long, TINY_PROMPTS[0], long[:20]]
        assert generate(model, rows, max_new_tokens=16).sequences == [hf_greedy(hf, p, 16) for p in rows]
        again = [long[:35] + [3, 4], long[:34]]  # their first 32 tokens are kept rows' (prefix reuse, CopyRows on ranks)
        assert generate(model, again, max_new_tokens=16).sequences == [hf_greedy(hf, p, 16) for p in again]


@pytest.fixture(scope="module")
def fused(models, tmp_path_factory):
    """The target saved with the draft fused into it (the draft whole on both of its ranks)."""
    import cluster

    _, target, _, root = models
    saved = tmp_path_factory.mktemp("fused")
    draft = trace_llama(root / "draft", tp_degree=1, layout=DecoderLayout((1, 4), (8, 16), (32, 64)), name="tiny-draft",
                        progress=False)
    with draft:
        cluster.trace.parallel_model_save(draft, saved / "draft")
    cluster.trace.parallel_model_save(target, saved / "target")
    cluster.trace.fuse_draft(saved / "target", saved / "draft")
    with cluster.trace.parallel_model_load(saved / "target") as loaded:
        yield loaded, saved


def test_fused_speculation_equals_target_only_and_the_separate_draft(models, fused):
    _, target, draft, _ = models
    loaded, _ = fused
    assert loaded.coordinator.info().extra["fused_draft"]["name"] == "tiny-draft"
    for rows in (1, 4):
        plain = generate(target, TINY_PROMPTS[:rows], max_new_tokens=20)
        for k in (3, 0):  # pinned, adaptive
            spec = generate(loaded, TINY_PROMPTS[:rows], max_new_tokens=20, draft_model="tiny-draft", speculation_length=k)
            assert spec.sequences == plain.sequences
    pinned = generate(loaded, TINY_PROMPTS[:1], max_new_tokens=20, draft_model="tiny-draft", speculation_length=3)
    assert pinned.stats.draft_tokens_proposed > 0
    # seeded sampling: the fused draft proposes what the separate one does, so the same tokens come out
    sampled = dict(max_new_tokens=16, temperature=0.9, seed=11, speculation_length=2)
    separate = generate(target, TINY_PROMPTS[:2], draft_model=draft, **sampled)
    together = generate(loaded, TINY_PROMPTS[:2], draft_model="tiny-draft", **sampled)
    assert together.sequences == separate.sequences


def test_fusing_refuses_a_pair_that_does_not_fit(models, fused, tmp_path):
    import cluster
    from cluster.errors import ArtifactError, InputError

    loaded, saved = fused
    with pytest.raises(InputError, match="is not fused into this model \\(its fused draft is 'tiny-draft'\\)"):
        generate(loaded, TINY_PROMPTS[:1], max_new_tokens=4, draft_model="another")
    _, target, _, _ = models
    with pytest.raises(InputError, match="trace it with tp_degree=1 \\(it has 2\\)"):
        cluster.trace.fuse_draft(saved / "target", saved / "target")  # a TP=2 model as the draft
    assert (saved / "target" / "draft" / "manifest.json").is_file()  # the refused fuse left the old draft
    (saved / "target" / "draft" / "manifest.json").write_text("{}")
    with pytest.raises(ArtifactError, match="its fused draft does not load"):
        cluster.trace.parallel_model_load(saved / "target")
