"""The OpenAI-compatible HTTP API through the real `openai` package (sync, async, streaming) against
a real gateway: the same vectors and the same greedy tokens as tpcluster.v1 (completions and chat
completions), OpenAI's error shape."""

import asyncio
import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest

from actors.gateway.app import BackgroundGateway, ServeConfig
from actors.gateway.server import GatewayConfig
from clients.client import Client
from cluster.models.defaults import build_decoder
from cluster.models.pair import pair_path
from tests.support import TINY_DRAFT, TINY_TARGET, minilm_tokens, save_random_llama

pytestmark = pytest.mark.integration

TOKEN = "s3cret"
PROMPT = "The for statement is used to iterate"
CHAT_PROMPT = "The for statement"  # 11 tokens as the plain template's user turn (the layout's prompts: 16)
TEXTS = ["The company HuggingFace is based in New York City", "Apples are especially bad for your health", "short"]
LAYOUT = {"batch_buckets": (1, 4), "prompt_buckets": (16,), "cache_buckets": (64, 256), "verify_tokens": 5}
DRAFT_LAYOUT = {"batch_buckets": (1, 4), "prompt_buckets": (16,), "cache_buckets": (64, 256)}


@pytest.fixture(scope="module")
def served(minilm_tp2, tmp_path_factory):
    """One gateway with a token: MiniLM embeddings, a TP=2 decoder and its TP=1 draft, gRPC and HTTP."""
    root = tmp_path_factory.mktemp("openai")
    save_random_llama(root / "t", 0, 4096, **TINY_TARGET)
    save_random_llama(root / "d", 1, 4096, **TINY_DRAFT)
    build_decoder(root / "t", root / "target", 2, LAYOUT, pair_path(), "target")
    build_decoder(root / "d", root / "draft", 1, DRAFT_LAYOUT, pair_path(), "draft")
    folders = {"minilm-embed": minilm_tp2["minilm-embed"], "target": root / "target", "draft": root / "draft"}
    gateway = BackgroundGateway(ServeConfig(models=folders, http_port=0, drafts={"target": "draft"},
                                            gateway=GatewayConfig(port=0, auth_token=TOKEN, health_interval_s=0.5)))
    yield gateway
    gateway.close()


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=served.http_url, api_key=TOKEN, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_client(served):
    with Client(served.target, token=TOKEN, timeout=120, retries=0) as c:
        yield c


def _post(served, path: str, body, token: str | None = TOKEN, headers: dict | None = None) -> tuple[int, dict]:
    """A raw POST (no client library): the status and the decoded JSON body."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(served.http_url + path, data=data, method="POST",
                                     headers={"content-type": "application/json", **(headers or {}),
                                              **({"authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _assert_error_shape(body: dict, error_type: str, param=None) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == error_type and body["error"]["param"] == param and body["error"]["message"], body


def test_models_are_listed_and_retrieved(client):
    listed = client.models.list()
    assert sorted(m.id for m in listed.data) == ["draft", "minilm-embed", "target"]
    target = client.models.retrieve("target")
    assert (target.id, target.owned_by, target.task, target.ready) == ("target", "tpcluster", "generate", True)
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("nope")
    assert caught.value.status_code == 404 and "no model named 'nope'" in caught.value.message


def test_embeddings_equal_the_grpc_embed_vectors(client, grpc_client):
    expected = grpc_client.embed(TEXTS, model="minilm-embed")
    as_base64 = client.embeddings.create(model="minilm-embed", input=TEXTS)  # the client's default encoding
    as_floats = client.embeddings.create(model="minilm-embed", input=TEXTS, encoding_format="float")
    for reply in (as_base64, as_floats):
        assert [d.index for d in reply.data] == [0, 1, 2] and reply.model == "minilm-embed"
        np.testing.assert_allclose(np.array([d.embedding for d in reply.data]), expected, atol=1e-6)
        assert reply.usage.prompt_tokens == reply.usage.total_tokens == int(minilm_tokens(TEXTS)[1].sum())
    one = client.embeddings.create(model="minilm-embed", input=TEXTS[2], dimensions=384)
    np.testing.assert_allclose(one.data[0].embedding, expected[2], atol=1e-6)


def test_greedy_completion_equals_grpc_generate(client, grpc_client):
    expected = grpc_client.generate(PROMPT, model="target", max_new_tokens=24)
    reply = client.completions.create(model="target", prompt=PROMPT, max_tokens=24, temperature=0,
                                      extra_body={"return_token_ids": True})
    (only,) = reply.choices
    assert only.token_ids == expected.token_ids and only.text == expected.text and only.finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (expected.stats.prompt_tokens, 24)
    assert reply.usage.total_tokens == expected.stats.prompt_tokens + 24 and reply.object == "text_completion"
    speculative = client.completions.create(model="target", prompt=PROMPT, max_tokens=24, temperature=0,
                                            extra_body={"return_token_ids": True, "draft_model": "draft",
                                                        "speculation_length": 3})
    assert speculative.choices[0].token_ids == expected.token_ids
    assert speculative.usage.draft_tokens_proposed > 0 and reply.usage.draft_tokens_proposed == 0
    paired = client.completions.create(model="target", prompt=PROMPT, max_tokens=24, temperature=0,
                                       extra_body={"speculation_length": 2})  # the gateway pairs target with draft
    assert paired.choices[0].text == expected.text and paired.usage.draft_tokens_proposed > 0


def test_streamed_chunks_concatenate_to_the_completion(client):
    whole = client.completions.create(model="target", prompt=PROMPT, max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model="target", prompt=PROMPT, max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text and len(texts) > 5
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_async_client_prompts_n_and_seeds_stream_what_they_complete(served):
    """Two prompts x n=2, sampled with a seed: each choice's chunks concatenate to that choice of the
    same request unstreamed, and the choices are indexed prompt-major as OpenAI's are."""
    async def run():
        async with openai.AsyncOpenAI(base_url=served.http_url, api_key=TOKEN, max_retries=0, timeout=120) as aclient:
            kwargs = {"model": "target", "prompt": [PROMPT, "Classes provide a means"], "n": 2, "max_tokens": 12,
                      "temperature": 0.9, "seed": 7}
            whole, stream = await asyncio.gather(aclient.completions.create(**kwargs),
                                                 aclient.completions.create(**kwargs, stream=True))
            parts: dict[int, str] = {}
            async for chunk in stream:
                for c in chunk.choices:
                    parts[c.index] = parts.get(c.index, "") + c.text
            again = await aclient.completions.create(**kwargs)
            vectors = await aclient.embeddings.create(model="minilm-embed", input=TEXTS[:2])
            return whole, parts, again, vectors

    whole, parts, again, vectors = asyncio.run(run())
    texts = [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(whole.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    assert [parts[i] for i in range(4)] == texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert texts[0] != texts[1]  # each of the n choices has its own seed
    assert whole.usage.completion_tokens == 48
    with Client(served.target, token=TOKEN, timeout=120, retries=0) as grpc_client:
        np.testing.assert_allclose([d.embedding for d in vectors.data], grpc_client.embed(TEXTS[:2], model="minilm-embed"),
                                   atol=1e-6)


def test_a_stop_sequence_cuts_the_text_as_grpc_does(client, grpc_client):
    full = grpc_client.generate(PROMPT, model="target", max_new_tokens=40)
    stop = full.text[len(full.text) // 2:][:6]
    assert stop.strip(), full.text
    cut = client.completions.create(model="target", prompt=PROMPT, max_tokens=40, temperature=0, stop=stop)
    assert cut.choices[0].text == full.text[: full.text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="target", prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_a_greedy_chat_is_the_generation_of_its_plain_rendering(client, grpc_client):
    """The shipped pair's tokenizer has no chat template: the prompt is the plain one (openai_chat)."""
    messages = [{"role": "system", "content": "Go."}, {"role": "user", "content": "The for"}]
    expected = grpc_client.generate("system: Go.\nuser: The for\nassistant:", model="target", max_new_tokens=16)
    reply = client.chat.completions.create(model="target", messages=messages, max_completion_tokens=16, max_tokens=3,
                                           temperature=0)
    (only,) = reply.choices
    assert (reply.object, only.message.role, only.message.content, only.finish_reason) == \
           ("chat.completion", "assistant", expected.text, "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (expected.stats.prompt_tokens, 16)


def test_a_streamed_chat_as_vllm_bench_serve_sends_it(client):
    """`vllm bench serve --backend openai-chat`'s request: text parts, max_completion_tokens, usage in the last chunk."""
    messages = [{"role": "user", "content": [{"type": "text", "text": CHAT_PROMPT}]}]
    whole = client.chat.completions.create(model="target", messages=messages, max_completion_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model="target", messages=messages, max_completion_tokens=20,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert (chunks[0].choices[0].delta.role, chunks[0].choices[0].delta.content) == ("assistant", "")
    contents = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert "".join(contents) == whole.choices[0].message.content and len(contents) > 5
    assert chunks[-2].choices[0].finish_reason == "length" and not chunks[-2].choices[0].delta.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_choices_and_stops_stream_what_they_complete(client, grpc_client):
    messages = [{"role": "user", "content": CHAT_PROMPT}]
    full = grpc_client.generate(f"user: {CHAT_PROMPT}\nassistant:", model="target", max_new_tokens=40)
    stop = full.text[len(full.text) // 2:][:6]
    assert stop.strip(), full.text
    cut = client.chat.completions.create(model="target", messages=messages, max_tokens=40, temperature=0, stop=stop)
    assert cut.choices[0].message.content == full.text[: full.text.index(stop)] and cut.choices[0].finish_reason == "stop"
    kwargs = {"model": "target", "messages": messages, "n": 2, "max_completion_tokens": 10, "temperature": 0.9, "seed": 3}
    whole = client.chat.completions.create(**kwargs)
    parts: dict[int, str] = {}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + (c.delta.content or "")
    texts = [c.message.content for c in sorted(whole.choices, key=lambda c: c.index)]
    assert [parts[0], parts[1]] == texts and texts[0] != texts[1] and whole.usage.completion_tokens == 20


def test_the_bearer_token_is_required(served):
    with openai.OpenAI(base_url=served.http_url, api_key="wrong", max_retries=0) as bad_client, \
            pytest.raises(openai.AuthenticationError) as caught:
        bad_client.models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    status, body = _post(served, "/embeddings", {"model": "minilm-embed", "input": "hi"}, token=None)
    assert status == 401
    _assert_error_shape(body, "authentication_error")
    health = urllib.request.urlopen(served.http_url.removesuffix("/v1") + "/health", timeout=30)  # open to probes
    assert json.loads(health.read())["ready_models"] == ["draft", "minilm-embed", "target"]


@pytest.mark.parametrize(("path", "body", "status", "error_type", "param", "says"), [
    ("/completions", {"model": "nope", "prompt": "x"}, 404, "not_found_error", None, "no model named 'nope'"),
    ("/completions", {"model": "target", "prompt": ""}, 400, "invalid_request_error", "prompt", "prompt is empty"),
    ("/completions", {"model": "target", "prompt": [1, 2, 3]}, 400, "invalid_request_error", "prompt", "token ids"),
    ("/completions", {"model": "target", "prompt": PROMPT, "temperature": -1}, 400, "invalid_request_error",
     "temperature", "temperature"),
    ("/completions", {"model": "target", "prompt": PROMPT, "max_tokens": 5000}, 400, "invalid_request_error",
     "max_tokens", "max_tokens 5000 is above 4096"),
    ("/completions", {"model": "target", "prompt": PROMPT, "max_tokens": 300}, 400, "invalid_request_error", None,
     "does not fit the KV cache"),
    ("/completions", {"model": "target", "prompt": PROMPT, "best_of": 3}, 400, "invalid_request_error", "best_of",
     "not supported"),
    ("/completions", {"model": "target", "prompt": PROMPT, "n": 0}, 400, "invalid_request_error", "n", "choices"),
    ("/completions", {"model": "draft", "prompt": PROMPT, "speculation_length": 2}, 400, "invalid_request_error",
     "speculation_length", "no draft paired"),
    ("/completions", {"model": "target", "prompt": PROMPT, "draft_model": "draft", "speculation_length": 9}, 400,
     "invalid_request_error", None, "speculation_length must be 1..4"),
    ("/completions", {"model": "target", "prompt": PROMPT, "draft_model": "nope"}, 404, "not_found_error", None, "'nope'"),
    ("/completions", {"model": "minilm-embed", "prompt": PROMPT}, 400, "invalid_request_error", None, "serves 'embed'"),
    ("/chat/completions", {"model": "target", "messages": [{"role": "user", "content": "x"}],
                           "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "invalid_request_error",
     "tools", "function calling"),
    ("/chat/completions", {"model": "target", "messages": [{"role": "tool", "content": "4"}]}, 400,
     "invalid_request_error", "messages", "tool messages"),
    ("/chat/completions", {"model": "target", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "invalid_request_error", "top_logprobs", "not supported"),
    ("/chat/completions", {"model": "target", "messages": [{"role": "user", "content": CHAT_PROMPT}],
                           "max_completion_tokens": 300}, 400, "invalid_request_error", None, "does not fit the KV cache"),
    ("/chat/completions", {"model": "minilm-embed", "messages": [{"role": "user", "content": "x"}]}, 400,
     "invalid_request_error", None, "serves 'embed'"),
    ("/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "not_found_error", None,
     "no model named 'nope'"),
    ("/embeddings", {"model": "target", "input": "x"}, 400, "invalid_request_error", None, "serves 'generate'"),
    ("/embeddings", {"model": "minilm-embed", "input": ["ok", " "]}, 400, "invalid_request_error", "input", "input[1] is empty"),
    ("/embeddings", {"model": "minilm-embed", "input": "x", "dimensions": 8}, 400, "invalid_request_error", "dimensions",
     "384 dimensions"),
    ("/embeddings", {"model": "minilm-embed", "input": ["x"] * 1025}, 429, "rate_limit_error", None, "at most 1024"),
    ("/embeddings", {"input": "x"}, 400, "invalid_request_error", "model", "model is missing"),
    ("/embeddings", b"{not json", 400, "invalid_request_error", None, "not valid JSON"),
    ("/nowhere", {}, 404, "not_found_error", None, "routes"),
])
def test_bad_requests_get_openai_errors_with_their_status(served, path, body, status, error_type, param, says):
    got, reply = _post(served, path, body)
    assert got == status, reply
    _assert_error_shape(reply, error_type, param)
    assert says in reply["error"]["message"]


def test_a_deadline_that_runs_out_is_504_and_the_gateway_keeps_serving(served, client):
    status, body = _post(served, "/completions", {"model": "target", "prompt": PROMPT, "max_tokens": 200},
                         headers={"x-request-timeout": "0.001"})
    assert status == 504 and body["error"]["code"] == "deadline_exceeded"
    _assert_error_shape(body, "timeout")
    status, body = _post(served, "/completions", {"model": "target", "prompt": PROMPT}, headers={"x-request-timeout": "soon"})
    assert status == 400 and "X-Request-Timeout" in body["error"]["message"]
    assert client.completions.create(model="target", prompt=PROMPT, max_tokens=5).usage.completion_tokens == 5


def test_a_client_that_leaves_a_stream_frees_its_slot(served, client):
    tokens = lambda: served.gateway.metrics.registry.get_sample_value(
        "tpcluster_generated_tokens_total", {"model": "target"}) or 0
    before = tokens()
    stream = client.completions.create(model="target", prompt=PROMPT, max_tokens=200, temperature=0, stream=True)
    for _, chunk in zip(range(3), stream):
        assert chunk.choices[0].finish_reason is None
    stream.close()  # drops the connection
    assert client.completions.create(model="target", prompt=PROMPT, max_tokens=8).usage.completion_tokens == 8
    schedulers = served.models["target"].schedulers
    for _ in range(100):  # the gateway sees the closed connection on its own loop: wait for it, bounded
        if all(not s.active and not s.closing and not s.waiting for s in schedulers):
            break
        time.sleep(0.1)
    assert [(len(s.active), len(s.closing), len(s.waiting)) for s in schedulers] == [(0, 0, 0)] * len(schedulers)
    assert tokens() - before == 8  # only the finished request's: the abandoned one was cancelled, not run out


def test_https_with_the_gateways_certificate_and_metrics(minilm_tp2, tmp_path):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True)
    config = GatewayConfig(port=0, auth_token=TOKEN, tls_cert=(tmp_path / "cert.pem").read_bytes(),
                           tls_key=(tmp_path / "key.pem").read_bytes())
    secured = BackgroundGateway(ServeConfig(models={"minilm-embed": minilm_tp2["minilm-embed"]}, http_port=0, gateway=config))
    try:
        assert secured.http_url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        request = urllib.request.Request(secured.http_url + "/embeddings", method="POST",
                                         data=json.dumps({"model": "minilm-embed", "input": "over TLS"}).encode(),
                                         headers={"authorization": f"Bearer {TOKEN}", "x-request-id": "tls-1"})
        with urllib.request.urlopen(request, timeout=60, context=context) as reply:
            assert reply.headers["x-request-id"] == "tls-1"
            assert len(json.loads(reply.read())["data"][0]["embedding"]) == 384
        with pytest.raises(OSError):  # plain HTTP is not served (URLError or a dropped connection)
            urllib.request.urlopen(secured.http_url.replace("https", "http") + "/models", timeout=10)
        sample = secured.gateway.metrics.registry.get_sample_value
        assert sample("tpcluster_requests_total", {"method": "openai.embeddings", "model": "minilm-embed", "code": "OK"}) == 1
    finally:
        secured.close()
