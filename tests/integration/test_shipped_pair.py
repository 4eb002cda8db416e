"""The shipped target/draft pair: speculative greedy is token for token target-only greedy, batch 1 and 4,
and the target writes English about Python."""

import pytest
from transformers import AutoTokenizer

from cluster.generation import DecoderLayout, generate
from cluster.models.llama import trace_llama
from cluster.models.pair import draft_path, pair_path, target_path

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (target_path() / "model.safetensors").exists(), reason="the pair is not in this checkout")]

PROMPTS = ["The for statement is used to", "A class definition", "Return the number of items in", "If the exception is raised"]


@pytest.fixture(scope="module")
def pair(ray_cluster):
    layout = DecoderLayout(batch_buckets=(1, 4), prompt_buckets=(16,), cache_buckets=(128,), verify_tokens=7)
    target = trace_llama(target_path(), tp_degree=2, layout=layout, name="target", progress=False)
    draft = trace_llama(draft_path(), tp_degree=1, layout=DecoderLayout((1, 4), (16,), (128,)), name="draft", progress=False)
    yield AutoTokenizer.from_pretrained(pair_path()), target, draft
    target.close()
    draft.close()


@pytest.mark.parametrize("rows", [1, 4])
def test_speculative_greedy_equals_target_only(pair, rows):
    tokenizer, target, draft = pair
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS[:rows]]
    plain = generate(target, ids, max_new_tokens=48)
    for k in (2, 4, 6):
        spec = generate(target, ids, max_new_tokens=48, draft_model=draft, speculation_length=k)
        assert spec.sequences == plain.sequences
        assert spec.stats.acceptance_rate > 0.2  # a trained pair agrees often; a random one almost never
    text = tokenizer.decode(plain.sequences[0])
    words = [w.strip(".,;:()'\"") for w in text.split()]
    common = {"the", "a", "is", "of", "to", "and", "in", "be", "if", "an", "for", "this", "that", "are", "or", "it", "with", "as", "by"}
    assert sum(w.lower() in common for w in words) >= 3, text  # English, not noise
