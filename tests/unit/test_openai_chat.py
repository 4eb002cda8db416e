"""OpenAI chat completions (actors.gateway.openai_chat): request checks, rendering with and without a
chat template, the response and chunk shapes (parsed by the `openai` package's own types), and the
route through the real HTTP server over a stand-in decoder. No cluster."""

import asyncio
from types import SimpleNamespace

import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from transformers import AutoTokenizer

from actors.gateway import openai_codec as oc
from actors.gateway.codec import MAX_TEXT_CHARS
from actors.gateway.openai_chat import ChatShape, decode_chat, render_chat, render_plain
from actors.gateway.openai_http import OpenAIServer
from actors.gateway.server import Gateway, GatewayConfig
from cluster import errors
from cluster.generation.defaults import DEFAULTS
from cluster.generation.stats import GenerationStats
from cluster.models.pair import pair_path

ZEPHYR = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def plain():
    """The shipped pair's tokenizer: it has no chat template and adds a BOS (<s>, id 0)."""
    return AutoTokenizer.from_pretrained(pair_path())


@pytest.fixture(scope="module")
def templated():
    tokenizer = AutoTokenizer.from_pretrained(pair_path())
    tokenizer.chat_template = ZEPHYR
    return tokenizer


def test_a_chat_is_the_completion_of_its_plain_rendering_with_openais_defaults():
    chat = decode_chat({"model": "m", "messages": CHAT})
    assert chat.model == "m" and chat.completion.prompts == ["system: Be brief.\nuser: Hi\nassistant:"]
    c = chat.completion
    assert (c.n, c.stream, c.include_usage, c.sampling.temperature, c.sampling.max_new_tokens) == \
           (1, False, False, 1.0, DEFAULTS.max_new_tokens)


def test_parameters_pass_through_and_max_completion_tokens_wins():
    chat = decode_chat({"model": "m", "messages": CHAT, "n": 3, "stop": ["\n", "."], "seed": 5, "temperature": 0,
                        "top_p": 0.5, "max_tokens": 9, "max_completion_tokens": 7, "stream": True,
                        "stream_options": {"include_usage": True}, "logprobs": False, "tools": [], "tool_choice": "none",
                        "response_format": {"type": "text"}, "user": "u"})
    c = chat.completion
    assert (c.n, c.stream, c.include_usage, c.sampling.stop, c.sampling.max_new_tokens) == (3, True, True, ("\n", "."), 7)
    assert (c.sampling.temperature, c.sampling.top_p) == (0.0, 0.5)
    assert [c.choice_sampling(j).seed for j in range(3)] == [5, 6, 7]
    assert decode_chat({"model": "m", "messages": CHAT, "max_tokens": 9}).completion.sampling.max_new_tokens == 9


def test_messages_take_text_parts_and_developer_is_system():
    chat = decode_chat({"model": "m", "messages": [
        {"role": "developer", "content": "Rules."},
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}], "name": "ann"},
        {"role": "assistant", "content": ""}]})
    assert chat.messages == ({"role": "system", "content": "Rules."}, {"role": "user", "content": "one\ntwo"},
                             {"role": "assistant", "content": ""})


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"messages": CHAT}, "model", "model is missing"),
    ({"model": "m"}, "messages", "non-empty list"),
    ({"model": "m", "messages": []}, "messages", "non-empty list"),
    ({"model": "m", "messages": ["Hi"]}, "messages", r"messages\[0\] must be an object"),
    ({"model": "m", "messages": [{"role": "tool", "content": "4", "tool_call_id": "c"}]}, "messages", "tool messages"),
    ({"model": "m", "messages": [{"role": "bot", "content": "x"}]}, "messages", "'bot' is not one of"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
     "messages", r"content\[0\] is a 'image_url' part"),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages", "string or a non-empty list"),
    ({"model": "m", "messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]}, "messages",
     "function calling"),
    ({"model": "m", "messages": CHAT, "tools": [{"type": "function"}]}, "tools", r"tools \(function calling\)"),
    ({"model": "m", "messages": CHAT, "tool_choice": "auto"}, "tool_choice", "not supported"),
    ({"model": "m", "messages": CHAT, "functions": [{"name": "f"}]}, "functions", "not supported"),
    ({"model": "m", "messages": CHAT, "logprobs": True}, "logprobs", "not supported"),
    ({"model": "m", "messages": CHAT, "top_logprobs": 2}, "top_logprobs", "log probabilities"),
    ({"model": "m", "messages": CHAT, "response_format": {"type": "json_object"}}, "response_format", "structured"),
    ({"model": "m", "messages": CHAT, "presence_penalty": 1}, "presence_penalty", "not supported"),
    ({"model": "m", "messages": CHAT, "max_completion_tokens": 5000}, "max_completion_tokens", "out of range"),
    ({"model": "m", "messages": CHAT, "max_completion_tokens": -1}, "max_completion_tokens", "out of range"),
    ({"model": "m", "messages": CHAT, "max_completion_tokens": "8"}, "max_completion_tokens", "out of range"),
    ({"model": "m", "messages": CHAT, "max_tokens": 5000}, "max_tokens", "above"),
    ({"model": "m", "messages": CHAT, "n": 0}, "n", "choices"),
    ({"model": "m", "messages": CHAT, "temperature": 101}, "temperature", "out of range"),
    ({"model": "m", "messages": CHAT, "stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
    ({"model": "m", "messages": [{"role": "user", "content": "x" * MAX_TEXT_CHARS}]}, "messages", "rendered messages"),
])
def test_bad_chat_requests_name_their_field(body, param, says):
    with pytest.raises(errors.InputError, match=says) as caught:
        decode_chat(body)
    assert caught.value.param == param


def test_without_a_chat_template_the_plain_template_renders(plain):
    messages = decode_chat({"model": "m", "messages": CHAT}).messages
    assert plain.chat_template is None
    assert render_chat(messages, plain) == render_plain(messages) == "system: Be brief.\nuser: Hi\nassistant:"
    assert render_chat(messages, None) == render_plain(messages)


def test_the_chat_template_renders_with_the_generation_prompt_and_one_bos(templated):
    chat = decode_chat({"model": "m", "messages": CHAT, "n": 2})
    rendered = chat.rendered(templated)
    assert rendered.prompts == ["<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"]
    assert (rendered.n, rendered.sampling) == (2, chat.completion.sampling)
    ids = templated(rendered.prompts[0], add_special_tokens=True)["input_ids"]
    assert ids[0] == templated.bos_token_id and ids.count(templated.bos_token_id) == 1


def test_a_template_without_bos_and_a_template_that_refuses(templated):
    messages = decode_chat({"model": "m", "messages": CHAT}).messages
    assert render_chat(messages, _AddsNoBos()) == "<s>Hi"  # the template's BOS is the prompt's only one
    refusing = AutoTokenizer.from_pretrained(pair_path())
    refusing.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(errors.InputError, match="chat template .* refused the messages: Conversation roles") as caught:
        render_chat(messages, refusing)
    assert caught.value.param == "messages"


class _AddsNoBos:
    """A tokenizer whose chat template writes the BOS and whose tokenizing adds none."""

    chat_template, bos_token, bos_token_id = "(a template)", "<s>", 0

    def apply_chat_template(self, messages, **kwargs):
        return "<s>" + messages[-1]["content"]

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [5]}


def test_chat_shapes_parse_as_the_openai_packages_types():
    shape = ChatShape("m")
    assert shape.id.startswith("chatcmpl-")
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    whole = ChatCompletion.model_validate(shape.envelope([shape.choice(0, "Hello", "stop"), shape.choice(1, "Hi", "length")],
                                                         usage))
    assert whole.object == "chat.completion" and [c.message.content for c in whole.choices] == ["Hello", "Hi"]
    assert whole.choices[0].message.role == "assistant" and whole.choices[1].finish_reason == "length"
    opening = [ChatCompletionChunk.model_validate(c) for c in shape.opening(2)]
    assert [(c.choices[0].index, c.choices[0].delta.role, c.choices[0].delta.content) for c in opening] == \
           [(0, "assistant", ""), (1, "assistant", "")]
    piece = shape.envelope([shape.piece(1, "lo", None, [7])], chunk=True)
    assert piece["object"] == "chat.completion.chunk" and piece["choices"][0]["delta"] == {"content": "lo"}
    assert piece["choices"][0]["token_ids"] == [7]
    end = shape.piece(0, "", "stop")
    assert end["delta"] == {} and end["finish_reason"] == "stop"
    ChatCompletionChunk.model_validate(shape.envelope([end], chunk=True))
    assert ChatCompletionChunk.model_validate(shape.envelope([], usage, chunk=True)).usage.total_tokens == 5


def test_completion_shapes_are_unchanged():
    shape = oc.CompletionShape("m")
    assert shape.id.startswith("cmpl-") and shape.opening(3) == []
    chunk = shape.envelope([shape.piece(0, "a", None)], chunk=True)
    assert chunk["object"] == "text_completion" and chunk["choices"][0] == oc.choice(0, "a", None)
    assert Completion.model_validate(shape.envelope([shape.choice(0, "ab", "stop")])).choices[0].text == "ab"


class _Decoder:
    """What the chat route asks of a decoder: it answers "Hi there!" a piece at a time, cut at max_tokens."""

    name, spec = "chat", SimpleNamespace(task="generate")

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.prompts: list[str] = []

    def need_task(self, *tasks: str) -> None:
        assert "generate" in tasks

    def draft_named(self, name: str, registry) -> None:
        return None

    async def generate(self, prompt, sampling, draft, timeout):
        self.prompts.append(prompt)
        pieces = ["Hi", " there", "!"][: sampling.max_new_tokens]
        for token, piece in enumerate(pieces):
            await asyncio.sleep(0)
            yield token, piece
        yield None, GenerationStats(prompt_tokens=4, generated_tokens=len(pieces),
                                    finish_reason="length" if len(pieces) < 3 else "eos")


def test_the_route_through_the_openai_client(templated):
    async def run():
        decoder = _Decoder(templated)
        http = OpenAIServer(Gateway({"chat": decoder}, GatewayConfig(port=0)), 0)
        port = await http.start()
        try:
            async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0) as client:
                whole = await client.chat.completions.create(model="chat", messages=CHAT, n=2)
                stream = await client.chat.completions.create(model="chat", messages=CHAT, max_completion_tokens=2,
                                                              stream=True, stream_options={"include_usage": True})
                chunks = [chunk async for chunk in stream]
                with pytest.raises(openai.BadRequestError) as caught:
                    await client.chat.completions.create(model="chat", messages=CHAT,
                                                         tools=[{"type": "function", "function": {"name": "f"}}])
        finally:
            await http.stop()
        return decoder.prompts, whole, chunks, caught.value

    prompts, whole, chunks, refused = asyncio.run(run())
    assert prompts == ["<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"] * 3
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert [(c.index, c.message.role, c.message.content, c.finish_reason) for c in whole.choices] == \
           [(0, "assistant", "Hi there!", "stop"), (1, "assistant", "Hi there!", "stop")]
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (4, 6, 10)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    deltas = [(c.choices[0].delta.role, c.choices[0].delta.content, c.choices[0].finish_reason) for c in chunks[:-1]]
    assert deltas == [("assistant", "", None), (None, "Hi", None), (None, " there", None), (None, None, "length")]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2
    assert refused.status_code == 400 and refused.body["param"] == "tools" and "function calling" in refused.message
