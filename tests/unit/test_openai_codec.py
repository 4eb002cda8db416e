"""The OpenAI API's JSON in and out (actors.gateway.openai_codec): request checks, defaults, the one
error-to-HTTP-status table, response shapes. No cluster."""

import base64

import numpy as np
import pytest

from actors.gateway import openai_codec as oc
from cluster import errors
from cluster.generation.defaults import DEFAULTS
from cluster.generation.stats import GenerationStats


@pytest.mark.parametrize(("error", "status"), [
    (errors.InputError("x"), 400), (errors.BucketError("x"), 400), (errors.ShardingError("x"), 400),
    (errors.ArtifactError("x"), 400), (errors.ModelNotFound("x"), 404), (errors.Overloaded("x"), 429),
    (errors.CapacityError("x"), 429), (errors.ModelUnavailable("x"), 503), (errors.CoordinatorLost("x"), 503),
    (errors.DraftUnavailable("x"), 503), (errors.RankFailure(1, "x"), 503), (errors.RankError(0, "x"), 500),
    (errors.ClusterTimeout("x"), 504), (TimeoutError(), 504), (RuntimeError("x"), 500),
])
def test_every_error_has_its_http_status_in_openais_shape(error, status):
    got, body = oc.error_of(error)
    assert got == status
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    assert body["error"]["type"] == {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error",
                                     500: "server_error", 503: "service_unavailable", 504: "timeout"}[status]


def test_every_cluster_error_status_is_in_the_table():
    statuses = {cls.status for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.ClusterError)}
    assert statuses <= set(oc.HTTP_STATUS)


def test_error_codes_and_params():
    assert oc.error_of(errors.ModelNotFound("no model"))[1]["error"]["code"] == "model_not_found"
    assert oc.error_of(errors.ClusterTimeout("late"))[1]["error"]["code"] == "deadline_exceeded"
    assert oc.error_of(oc.bad("top_p", "no"))[1]["error"] == {"message": "no", "type": "invalid_request_error",
                                                             "param": "top_p", "code": "invalid_argument"}


def test_a_completion_gets_openais_defaults_and_the_wire_rounding():
    request = oc.decode_completion({"model": "m", "prompt": "hello"})
    assert (request.prompts, request.n, request.stream) == (["hello"], 1, False)
    sampling = request.sampling
    assert sampling.temperature == 1.0 and sampling.max_new_tokens == DEFAULTS.max_new_tokens and sampling.seed is None
    # the same float32 value a tpcluster.v1 client's temperature arrives as, so seeded draws agree
    assert oc.decode_completion({"model": "m", "prompt": "x", "temperature": 0.7}).sampling.temperature == np.float32(0.7)


def test_seeded_choices_get_their_own_seeds():
    request = oc.decode_completion({"model": "m", "prompt": ["a", "b"], "n": 3, "seed": 5, "stop": "\n",
                                    "max_tokens": 9, "top_k": 4, "draft_model": "d", "speculation_length": 2})
    assert [request.choice_sampling(j).seed for j in range(3)] == [5, 6, 7]
    s = request.sampling
    assert (s.stop, s.max_new_tokens, s.top_k, s.draft_model, s.speculation_length) == (("\n",), 9, 4, "d", 2)
    paired = oc.decode_completion({"model": "m", "prompt": "a", "speculation_length": 3}, drafts={"m": "d2"})
    assert (paired.sampling.draft_model, paired.sampling.speculation_length) == ("d2", 3)
    unseeded = oc.decode_completion({"model": "m", "prompt": "a", "n": 2})
    assert unseeded.choice_sampling(1).seed is None


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"prompt": "x"}, "model", "model is missing"),
    ({"model": "m"}, "prompt", "non-empty string"),
    ({"model": "m", "prompt": [[1, 2]]}, "prompt", "token ids"),
    ({"model": "m", "prompt": "x", "n": 0}, "n", "choices"),
    ({"model": "m", "prompt": ["x"] * 33, "n": 2}, "n", "1 to 64 choices"),
    ({"model": "m", "prompt": "x", "stop": ["a"] * 5}, "stop", "at most 4"),
    ({"model": "m", "prompt": "x", "stop": [""]}, "stop", "non-empty"),
    ({"model": "m", "prompt": "x", "max_tokens": -1}, "max_tokens", "non-negative"),
    ({"model": "m", "prompt": "x", "max_tokens": 5000}, "max_tokens", "max_tokens 5000 is above"),
    ({"model": "m", "prompt": "x", "max_tokens": "ten"}, "max_tokens", "wrong type"),
    ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens", "must be a number"),
    ({"model": "m", "prompt": "x", "temperature": 101}, "temperature", "out of range"),
    ({"model": "m", "prompt": "x", "top_p": 0}, "top_p", "keeps no token"),
    ({"model": "m", "prompt": "x", "top_p": 1.5}, "top_p", "out of range"),
    ({"model": "m", "prompt": "x", "seed": -1}, "seed", "non-negative"),
    ({"model": "m", "prompt": "x", "speculation_length": 3}, "speculation_length", "needs draft_model"),
    ({"model": "m", "prompt": "x", "draft_model": "d", "speculation_length": 17}, "speculation_length", "above 16"),
    ({"model": "m", "prompt": "x", "logprobs": 2}, "logprobs", "not supported"),
    ({"model": "m", "prompt": "x", "echo": True}, "echo", "not supported"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
    ({"model": "m", "prompt": ["ok", " "]}, "prompt", "prompt is empty"),
])
def test_bad_completion_requests_name_their_field(body, param, says):
    with pytest.raises(errors.InputError, match=says) as caught:
        oc.decode_completion(body)
    assert caught.value.param == param


def test_off_values_of_unsupported_parameters_are_accepted():
    oc.decode_completion({"model": "m", "prompt": "x", "echo": False, "logprobs": None, "best_of": 1,
                          "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "user": "u"})


def test_embedding_requests():
    request = oc.decode_embedding({"model": "e", "input": "one"})
    assert (request.texts, request.base64, request.dimensions) == (["one"], False, None)
    assert oc.decode_embedding({"model": "e", "input": ["a", "b"], "encoding_format": "base64"}).base64
    for body, param, says in [({"model": "e", "input": [1, 2]}, "input", "token ids"),
                              ({"model": "e", "input": "x", "encoding_format": "int8"}, "encoding_format", "int8"),
                              ({"model": "e", "input": []}, "input", "non-empty"),
                              ({"model": "e", "input": "x" * 100_001}, "input", "at most 100000")]:
        with pytest.raises(errors.InputError, match=says) as caught:
            oc.decode_embedding(body)
        assert caught.value.param == param
    with pytest.raises(errors.Overloaded, match="at most 1024"):
        oc.decode_embedding({"model": "e", "input": ["x"] * 1025})


def test_embedding_responses_carry_float32_exactly_in_both_encodings():
    vectors = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    plain = oc.embedding_response(oc.EmbeddingRequest("e", ["a", "b"]), vectors, 7)
    packed = oc.embedding_response(oc.EmbeddingRequest("e", ["a", "b"], base64=True), vectors, 7)
    assert plain["usage"] == {"prompt_tokens": 7, "total_tokens": 7} and plain["object"] == "list"
    assert [d["index"] for d in plain["data"]] == [0, 1] and plain["data"][0]["object"] == "embedding"
    np.testing.assert_array_equal(np.array([d["embedding"] for d in plain["data"]], dtype=np.float32), vectors)
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in packed["data"]]
    np.testing.assert_array_equal(decoded, vectors)
    with pytest.raises(errors.InputError, match="gives 5 dimensions") as caught:
        oc.embedding_response(oc.EmbeddingRequest("e", ["a"], dimensions=3), vectors, 1)
    assert caught.value.param == "dimensions"


def test_usage_counts_each_prompt_once_and_sums_the_choices():
    stats = [GenerationStats(prompt_tokens=p, generated_tokens=g, draft_tokens_proposed=d)
             for p, g, d in [(4, 10, 6), (4, 8, 0), (7, 3, 3), (7, 5, 0)]]
    assert oc.usage(stats, prompts=2, n=2) == {"prompt_tokens": 11, "completion_tokens": 26, "total_tokens": 37,
                                               "draft_tokens_proposed": 9, "draft_tokens_accepted": 0}
    assert [oc.finish_reason(r) for r in ("length", "eos", "stop", "cancelled")] == ["length", "stop", "stop", "length"]


def test_ignore_eos_generates_max_tokens_whatever_comes():
    body = {"model": "m", "prompt": "hi", "max_tokens": 8}
    assert oc.decode_completion(body).sampling.request([1, 2], eos_token_id=2).eos_token_id == 2
    ignoring = oc.decode_completion({**body, "ignore_eos": True}).sampling
    assert ignoring.ignore_eos and ignoring.request([1, 2], eos_token_id=2).eos_token_id is None
