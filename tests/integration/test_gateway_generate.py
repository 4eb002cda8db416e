"""Generate through the gateway: streamed tokens equal transformers' greedy tokens; cancel frees the model."""

import shutil

import grpc
import numpy as np
import pytest

from clients import errors
from clients.client import Client
from clients.protocol import inference_pb2 as pb
from clients.protocol import inference_pb2_grpc as pb_grpc
from cluster.models.defaults import build_decoder
from cluster.models.pair import pair_path
from cluster.trace import fuse_draft
from tests.integration.harness import GatewayThread
from tests.support import PAIR_VOCAB, PROMPT, TINY_DRAFT, TINY_TARGET, hf_greedy, save_random_llama

pytestmark = pytest.mark.integration

LAYOUT = dict(batch_buckets=(1, 4), prompt_buckets=(16,), cache_buckets=(64, 256), verify_tokens=5)
DRAFT_LAYOUT = dict(batch_buckets=(1, 4), prompt_buckets=(16,), cache_buckets=(64, 256))


@pytest.fixture(scope="module")
def decoders(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    hf = save_random_llama(root / "t", 0, PAIR_VOCAB, **TINY_TARGET)
    save_random_llama(root / "d", 1, PAIR_VOCAB, **TINY_DRAFT)
    build_decoder(root / "t", root / "target", 2, LAYOUT, pair_path(), "target")
    build_decoder(root / "d", root / "draft", 1, DRAFT_LAYOUT, pair_path(), "draft")
    shutil.copytree(root / "target", root / "fused")  # the same target, with the draft fused into it
    fuse_draft(root / "fused", root / "draft")
    served = GatewayThread({"target": root / "target", "draft": root / "draft", "fused": root / "fused"})
    yield served, hf
    served.close()


def _tokens(stream):
    ids, text, stats = [], "", None
    for event in stream:
        if event.HasField("token"):
            ids.append(event.token.id)
            text += event.token.text
        else:
            stats = event.stats
    return ids, text, stats


def test_generate_streams_what_transformers_generates(decoders):
    served, hf = decoders
    from transformers import AutoTokenizer

    prompt_ids = AutoTokenizer.from_pretrained(pair_path())(PROMPT)["input_ids"]
    expected = hf_greedy(hf, prompt_ids, 40)
    with Client(served.target) as client:
        ids, text, stats = _tokens(client.generate_stream(PROMPT, model="target", max_new_tokens=40))
        assert ids == expected and stats.generated_tokens == 40 and stats.finish_reason == "length"
        spec_ids, _, spec = _tokens(client.generate_stream(PROMPT, model="target", max_new_tokens=40, draft_model="draft",
                                                           speculation_length=3))
        assert spec_ids == expected and spec.draft_tokens_proposed > 0
        assert spec.acceptance_rate == pytest.approx(spec.draft_tokens_accepted / spec.draft_tokens_proposed)
        assert spec.mean_accepted_length >= 1
        target = next(m for m in client.status().models if m.name == "target")
        assert target.generations >= 2  # this model has no extend graphs: no prefix reuse
        assert (target.prefix_hits, target.prefix_reused_tokens) == (0, 0)
    with grpc.insecure_channel(served.target) as channel:  # the raw generated stubs
        raw = pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(model="target", prompt=PROMPT, max_new_tokens=40), timeout=60)
        assert _tokens(raw)[0] == expected


def test_the_library_api_on_the_gateways_replica_and_the_rounds_it_counts(decoders):
    """What `tpcluster bench --only step` compares: a Generate stream, and the library API on the same
    replica; the scheduler counts the coordinator's rounds (one or more tokens each for one stream)."""
    from transformers import AutoTokenizer

    from cluster.generation import generate
    from cluster.trace.model import ParallelModel

    served, _ = decoders
    scheduler = served.models["target"].schedulers[0]
    before = scheduler.rounds
    with Client(served.target) as client:
        ids, _, stats = _tokens(client.generate_stream(PROMPT, model="target", max_new_tokens=20))
    rounds = scheduler.rounds - before
    assert stats.generated_tokens == 20 and 1 <= rounds <= 20
    prompt_ids = AutoTokenizer.from_pretrained(pair_path())(PROMPT)["input_ids"]
    library = generate(ParallelModel(scheduler.replica.coordinator), [prompt_ids], max_new_tokens=20)
    assert library.sequences[0] == ids and scheduler.rounds - before == rounds  # the gateway's stream saw none of it


def test_a_fused_draft_speculates_on_the_targets_own_ranks(decoders):
    """"fused" holds the draft on its ranks: naming it speculates with no draft replica borrowed; the
    tokens are the target's (greedy), and seeded sampling gives what the separate draft gives."""
    served, _ = decoders
    with Client(served.target) as client:
        assert client.get_model("fused").fused_draft == "draft" and client.get_model("target").fused_draft == ""
        plain = _tokens(client.generate_stream(PROMPT, model="target", max_new_tokens=30))[0]
        for k in (3, 0):  # pinned, adaptive
            ids, _, stats = _tokens(client.generate_stream(PROMPT, model="fused", max_new_tokens=30, draft_model="draft",
                                                           speculation_length=k))
            assert ids == plain
            if k:
                assert stats.draft_tokens_proposed > 0
        sampled = dict(max_new_tokens=20, temperature=0.9, seed=5, draft_model="draft", speculation_length=2)
        separate = _tokens(client.generate_stream(PROMPT, model="target", **sampled))[0]
        assert _tokens(client.generate_stream(PROMPT, model="fused", **sampled))[0] == separate


def test_ngram_lookup_speculates_without_a_draft_model(decoders):
    """draft_model="[ngram]": proposals from the stream's own repeated n-grams, verified by the target."""
    served, _ = decoders
    prompt = "for x in a: for x in a: print"
    with Client(served.target) as client:
        plain = _tokens(client.generate_stream(prompt, model="target", max_new_tokens=30))[0]
        for k in (3, 0):  # pinned, adaptive
            ids, _, stats = _tokens(client.generate_stream(prompt, model="target", max_new_tokens=30, draft_model="[ngram]",
                                                           speculation_length=k))
            assert ids == plain and stats.generated_tokens == 30
            if k:
                assert stats.draft_tokens_proposed > 0


def test_bad_generate_requests(decoders):
    served, _ = decoders
    with Client(served.target, retries=0) as client:
        cases = [
            (dict(prompt=""), errors.InvalidArgument, "prompt is empty"),
            (dict(prompt="word " * 40), errors.InvalidArgument, "takes at most 16"),
            (dict(prompt=PROMPT, max_new_tokens=300), errors.InvalidArgument, "does not fit the KV cache"),
            (dict(prompt=PROMPT, temperature=-1.0), errors.InvalidArgument, "temperature"),
            (dict(prompt=PROMPT, top_p=1.5), errors.InvalidArgument, "top_p"),
            (dict(prompt=PROMPT, draft_model="draft", speculation_length=9), errors.InvalidArgument, "speculation_length must be 1..4"),
            (dict(prompt=PROMPT, draft_model="nope"), errors.NotFound, "no model named 'nope'"),
        ]
        for kwargs, error, text in cases:
            prompt = kwargs.pop("prompt")
            with pytest.raises(error, match=text):
                client.generate(prompt, model="target", **kwargs)
        assert client.generate(PROMPT, model="target", max_new_tokens=5).stats.generated_tokens == 5


def test_cancelled_stream_frees_the_model(decoders):
    served, _ = decoders
    with Client(served.target) as client:
        stream = client.generate_stream(PROMPT, model="target", max_new_tokens=200)
        for _, event in zip(range(3), stream):
            assert event.HasField("token")
        stream.close()  # the client cancels the call
        after = client.generate(PROMPT, model="target", max_new_tokens=8)
    assert after.stats.generated_tokens == 8
    # the abandoned generation (200 tokens) left its slot within the 8 steps the second one took
    schedulers = served.models["target"].schedulers
    assert [(len(s.active), len(s.closing), len(s.waiting)) for s in schedulers] == [(0, 0, 0)] * len(schedulers)


def test_many_concurrent_cancellations_do_not_wedge_the_model(decoders):
    """TGI's known failure: after abandoned generations every later request timed out. Not here."""
    import concurrent.futures as futures

    served, _ = decoders

    def cancel_a_few(_):
        with Client(served.target, timeout=30, retries=0) as client:
            for _ in range(5):
                stream = client.generate_stream(PROMPT, model="target", max_new_tokens=100)
                assert next(stream).HasField("token")
                stream.close()

    with futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(cancel_a_few, range(4)))
    with Client(served.target, timeout=30, retries=0) as client:
        assert client.generate(PROMPT, model="target", max_new_tokens=10).stats.generated_tokens == 10


def test_concurrent_generations_share_steps_and_each_gets_its_own_tokens(decoders):
    """Continuous batching: 7 clients on 4 cache slots (plain, speculative, sampled) join and leave
    mid-generation; each stream equals what that request generates alone."""
    import concurrent.futures as futures

    served, _ = decoders
    requests = [
        dict(prompt=f"{PROMPT} number {i}", max_new_tokens=12 + 5 * i,
             **({"draft_model": "draft", "speculation_length": 1 + i % 4} if i % 3 == 1 else {}),
             **({"temperature": 0.8, "top_k": 50, "seed": 100 + i} if i % 3 == 2 else {}))
        for i in range(7)
    ]

    def run(kwargs):
        kwargs = dict(kwargs)
        with Client(served.target, timeout=120, retries=0) as client:
            return _tokens(client.generate_stream(kwargs.pop("prompt"), model="target", **kwargs))[0]

    def extra_rows():  # rows per step beyond one, summed over the steps so far
        sample = served.gateway.metrics.registry.get_sample_value
        labels = {"model": "target"}
        return (sample("tpcluster_batch_rows_sum", labels) or 0) - (sample("tpcluster_batch_rows_count", labels) or 0)

    alone = [run(r) for r in requests]
    before = extra_rows()
    with futures.ThreadPoolExecutor(7) as pool:
        together = list(pool.map(run, requests))
    assert together == alone
    assert [len(t) for t in together] == [r["max_new_tokens"] for r in requests]
    assert extra_rows() > before  # steps carried several sequences


def test_a_draft_model_serves_its_own_requests_while_lent_for_speculation(decoders):
    """The draft's one replica is lent to the target's batch while it speculates: its own Generate
    requests wait for it and then run, and nobody's tokens change."""
    import concurrent.futures as futures

    served, _ = decoders
    jobs = [("target", dict(draft_model="draft", speculation_length=3)), ("draft", {}), ("target", {})] * 3

    def run(i):
        model, kwargs = jobs[i]
        with Client(served.target, timeout=120, retries=0) as client:
            return _tokens(client.generate_stream(f"{PROMPT} {i}", model=model, max_new_tokens=20, **kwargs))[0]

    alone = [run(i) for i in range(len(jobs))]
    with futures.ThreadPoolExecutor(len(jobs)) as pool:
        assert list(pool.map(run, range(len(jobs)))) == alone
    draft_scheduler = served.models["draft"].schedulers[0]
    assert draft_scheduler.lent_to is None and not served.models["target"].schedulers[0].active  # all returned


def test_a_stop_sequence_ends_the_stream_with_its_stats(decoders):
    served, _ = decoders
    with Client(served.target, timeout=120, retries=0) as client:
        full = client.generate(PROMPT, model="target", max_new_tokens=40, draft_model="draft", speculation_length=3)
        stop = full.text[len(full.text) // 2:][:6]
        assert stop.strip(), full.text
        cut = client.generate(PROMPT, model="target", max_new_tokens=40, draft_model="draft", speculation_length=3, stop=[stop])
    assert cut.stats.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.stats.draft_tokens_proposed > 0  # the counts came with the freed slot


def test_decoder_metadata_tokenize_and_the_open_inference_protocol(decoders):
    """A decoder advertises no Infer signature (and refuses Infer), states its limits, tokenizes, and
    generates through the Open Inference Protocol (Triton's client) the same greedy text as Generate."""
    from tests.integration.triton import run_tritonclient

    served, _ = decoders
    with Client(served.target) as client:
        meta = client.get_model("target")
        assert list(meta.inputs) == [] and list(meta.rpcs) == ["Generate", "Tokenize"]
        limits = meta.limits
        assert (limits.max_new_tokens, limits.default_max_new_tokens, limits.default_speculation_length) == (4096, 64, 0)
        assert limits.max_speculation_length == LAYOUT["verify_tokens"] - 1
        assert limits.context_length == max(LAYOUT["cache_buckets"]) - 1 and limits.max_texts == 1024
        assert client.get_model("draft").limits.max_speculation_length == 0  # no verify graphs: never a target
        with pytest.raises(errors.InvalidArgument, match="is a decoder: Infer would overwrite the KV cache"):
            client.infer("target", [np.zeros((1, 4), np.int64)] * 4)
        ids = client.tokenize([PROMPT], model="target")[0]
        assert client.detokenize([ids], model="target", skip_special_tokens=True) == [PROMPT]
        expected = client.generate(PROMPT, model="target", max_new_tokens=12)
    got = run_tritonclient(served.target, f"""
out = infer("target", {{"text_input": np.array([{PROMPT!r}], dtype=object)}},
            parameters={{"max_tokens": 12, "temperature": 0.0}})
meta = client.get_model_metadata("target", as_json=True)
print(json.dumps({{"text": out["text_output"], "inputs": meta["inputs"], "outputs": meta["outputs"],
                  "bad": error(lambda: infer("target", {{"text_input": np.array(["x"], dtype=object)}},
                                             parameters={{"max_tokens": 5000}}))}}))
""")
    assert got["text"] == [expected.text]
    assert [(t["name"], t["datatype"]) for t in got["inputs"] + got["outputs"]] == [("text_input", "BYTES"), ("text_output", "BYTES")]
    assert got["bad"][0] == "StatusCode.INVALID_ARGUMENT" and "above 4096" in got["bad"][1]
