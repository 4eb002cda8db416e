"""OpenAI's chat completions (POST /v1/chat/completions) as a completion of one rendered prompt.

A chat request is checked here, then handed to the completions codec (openai_codec.decode_completion)
as the completion of one prompt, so `n`, `stop`, `temperature`, `top_p`, `seed`, `stream`,
`stream_options` and the extensions (`top_k`, `draft_model`, `speculation_length`,
`return_token_ids`) mean and check exactly what they do there; `max_completion_tokens` is
`max_tokens` (and wins over it). The prompt is the messages rendered for the served model:

- with its tokenizer's chat template (`chat_template` in the checkpoint's `tokenizer_config.json`,
  or its `chat_template.jinja`): `tokenizer.apply_chat_template(messages, tokenize=False,
  add_generation_prompt=True)`; a leading BOS the template writes is dropped when the tokenizer adds
  its own (the gateway tokenizes prompts with special tokens), so the prompt carries one BOS;
- without one, the plain template: each message as `<role>: <content>` and a newline, then
  `assistant:` (the text the reply continues), e.g. "system: Be brief.\\nuser: Hi\\nassistant:".

A message's `content` is a string or a list of text parts ({"type": "text", "text": ...}, joined
with newlines); roles are system, developer (rendered as system), user and assistant. Function
calling (tools, tool messages), log probabilities, structured output and non-text parts are refused
with a 400 naming the field. The responses are ChatShape's: `chat.completion` with each choice's
`message`, or `chat.completion.chunk`s whose choices carry a `delta`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from actors.gateway import openai_codec as oc
from actors.gateway.codec import MAX_TEXT_CHARS
from cluster.errors import InputError
from cluster.generation.defaults import DEFAULTS

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# chat parameters this server does not implement: (the values that mean "off", what the parameter is for)
CHAT_UNSUPPORTED = {
    "tools": ((None, []), "function calling"), "tool_choice": ((None, "none"), "function calling"),
    "functions": ((None, []), "function calling"), "function_call": ((None, "none"), "function calling"),
    "top_logprobs": ((None, 0), "log probabilities"), "response_format": ((None, {"type": "text"}), "structured output"),
    "modalities": ((None, ["text"]), "non-text output"), "audio": ((None,), "audio output"),
}


def _content(value: Any, where: str) -> str:
    """A message's content as text: a string, or text parts joined with newlines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise oc.bad("messages", f"{where}.content[{j}] is a {kind!r} part; only text parts "
                                         '({"type": "text", "text": ...}) are supported')
            texts.append(part["text"])
        return "\n".join(texts)
    raise oc.bad("messages", f"{where}.content must be a string or a non-empty list of text parts")


def decode_messages(value: Any) -> tuple[dict[str, str], ...]:
    """The request's `messages` as {"role", "content"} with text content (developer as system)."""
    if not isinstance(value, list) or not value:
        raise oc.bad("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise oc.bad("messages", f"{where} must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise oc.bad("messages", f"{where}.role {role!r} is not one of system, developer, user, assistant "
                                     "(tool messages need function calling, which this server does not support)")
        for key in ("tool_calls", "function_call"):
            if message.get(key):
                raise oc.bad("messages", f"{where}.{key}: function calling is not supported by this server")
        out.append({"role": ROLES[role], "content": _content(message.get("content"), where)})
    return tuple(out)


def render_plain(messages: tuple[dict[str, str], ...]) -> str:
    """The plain template of a model without a chat template: `<role>: <content>` lines, then `assistant:`."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]


def render_chat(messages: tuple[dict[str, str], ...], tokenizer: Any) -> str:
    """The prompt of `messages` for a model: its tokenizer's chat template, else the plain template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return render_plain(messages)
    try:
        text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:
        raise oc.bad("messages", f"the model's chat template (tokenizer_config.json's chat_template) refused "
                                 f"the messages: {exc}") from exc
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos):]  # tokenizing the prompt adds it again
    return text


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[dict[str, str], ...]
    completion: oc.CompletionRequest  # its one prompt is the plain rendering until `rendered` puts in the model's

    @property
    def model(self) -> str:
        return self.completion.model

    def rendered(self, tokenizer: Any) -> oc.CompletionRequest:
        """The completion of the messages rendered for the model whose tokenizer this is."""
        prompt = render_chat(self.messages, tokenizer)
        if not prompt.strip():
            raise oc.bad("messages", "the messages render to an empty prompt; send some text")
        if len(prompt) > MAX_TEXT_CHARS:
            raise oc.bad("messages", f"the messages render to {len(prompt)} characters; at most {MAX_TEXT_CHARS}")
        return dataclasses.replace(self.completion, prompts=[prompt])


def decode_chat(body: dict[str, Any], drafts: dict[str, str] | None = None) -> ChatRequest:
    """A POST /v1/chat/completions body (the extensions and `drafts` are decode_completion's)."""
    oc.model_name(body)
    messages = decode_messages(body.get("messages"))
    for name, (off, purpose) in CHAT_UNSUPPORTED.items():
        if name in body and body[name] not in off:
            raise oc.bad(name, f"{name} ({purpose}) is not supported by this server; leave it out")
    forwarded = {k: v for k, v in body.items() if k not in ("messages", "prompt", "max_completion_tokens")}
    limit = body.get("max_completion_tokens")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= DEFAULTS.max_new_tokens_limit:
            raise oc.bad("max_completion_tokens", f"max_completion_tokens {limit!r} is out of range; send an integer "
                                                  f"from 1 to {DEFAULTS.max_new_tokens_limit}")
        forwarded["max_tokens"] = limit
    forwarded["prompt"] = render_plain(messages)
    try:
        completion = oc.decode_completion(forwarded, drafts)
    except InputError as exc:
        if getattr(exc, "param", None) == "prompt":
            raise oc.bad("messages", f"the rendered messages: {exc}") from exc
        raise
    return ChatRequest(messages, completion)


class ChatShape(oc.CompletionShape):
    """A chat completion's response (`message` per choice) and chunks (`delta` per choice; each
    choice's stream opens with the assistant role and empty content, and ends with an empty delta
    carrying its finish_reason)."""

    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    @staticmethod
    def _choice(index: int, key: str, value: dict[str, Any], reason: str | None,
                token_ids: list[int] | None) -> dict[str, Any]:
        out = {"index": index, key: value, "logprobs": None, "finish_reason": reason}
        if token_ids is not None:
            out["token_ids"] = token_ids
        return out

    def choice(self, index: int, text: str, reason: str | None, token_ids: list[int] | None = None) -> dict[str, Any]:
        return self._choice(index, "message", {"role": "assistant", "content": text}, reason, token_ids)

    def piece(self, index: int, text: str, reason: str | None, token_ids: list[int] | None = None) -> dict[str, Any]:
        delta = {} if reason is not None and not text else {"content": text}
        return self._choice(index, "delta", delta, reason, token_ids)

    def opening(self, count: int) -> list[dict[str, Any]]:
        return [self.envelope([self._choice(i, "delta", {"role": "assistant", "content": ""}, None, None)], chunk=True)
                for i in range(count)]
