"""The OpenAI HTTP API's JSON in and out (the routes in actors.gateway.openai_http only call these).

Requests are checked here and refused with InputError (400) naming the field (`param`). A
completion becomes a tpcluster.v1 GenerateRequest and goes through the gRPC codec's checks
(`codec.decode_generate`), so both fronts accept the same values and resolve the same defaults.
`http_status_of` is the one place that turns our errors (their `status`, cluster/errors.py) into
HTTP statuses and OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.gateway import codec
from actors.gateway.codec import Sampling
from clients.protocol import inference_pb2 as pb
from cluster.errors import ClusterError, ClusterTimeout, InputError
from cluster.generation.defaults import DEFAULTS

MAX_CHOICES = 64  # prompts x n in one completion request: they decode together (continuous batching)
MAX_STOPS = 4  # OpenAI's own limit on `stop`

# gRPC status name (ClusterError.status) -> HTTP status, as google.rpc.Code documents the pairs
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "ABORTED": 409, "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "INTERNAL": 500,
}
# HTTP status -> OpenAI's error `type`
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
              429: "rate_limit_error", 499: "cancelled", 501: "not_implemented", 503: "service_unavailable",
              504: "timeout"}
# parameters of OpenAI's completions API this server does not implement, with the value that means "off"
UNSUPPORTED = {"best_of": (None, 1), "logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {})}


def bad(param: str | None, message: str) -> InputError:
    """An InputError (400) that names the request field it is about (OpenAI's `param`)."""
    error = InputError(message)
    error.param = param
    return error


def http_status_of(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, message) of an exception: our errors name their status; a wait that ran out is
    504 wherever it happened; anything else is 500 (the gateway logs it)."""
    if isinstance(exc, (asyncio.TimeoutError, ClusterTimeout)):
        return 504, str(exc) or "the request did not finish before its deadline"
    if isinstance(exc, ClusterError):
        return HTTP_STATUS.get(exc.status, 500), str(exc)
    return 500, f"internal error ({type(exc).__name__}); see the gateway log"


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": ERROR_TYPE.get(status, "server_error"), "param": param, "code": code}}


def error_of(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error body) of an exception raised while serving a request."""
    status, message = http_status_of(exc)
    code = getattr(exc, "status", None)
    if status == 504:
        code = "DEADLINE_EXCEEDED"
    code = {"NOT_FOUND": "model_not_found"}.get(code, code.lower() if code else "internal")
    return status, error_body(status, message, getattr(exc, "param", None), code)


# -- requests ---------------------------------------------------------------------------------
def _get(body: dict[str, Any], name: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise bad(name, f"{name} must be a number, not {value!r}")
    if not isinstance(value, kinds):
        raise bad(name, f"{name} has the wrong type ({type(value).__name__}); see the OpenAI API reference")
    return value


def _texts(value: Any, name: str) -> list[str]:
    """A string or a list of strings (token-id arrays are refused)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, list) and value and all(isinstance(v, (int, list)) for v in value):
        raise bad(name, f"{name} as token ids is not supported; send text (a string or a list of strings)")
    raise bad(name, f"{name} must be a non-empty string or list of strings")


def model_name(body: dict[str, Any]) -> str:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise bad("model", "model is missing; name one of GET /v1/models")
    return name


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: list[str]
    sampling: Sampling
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False  # extension (as vLLM's): each choice carries its token ids

    def choice_sampling(self, index: int) -> Sampling:
        """Choice `index` of a prompt: a seeded request gives each of its n choices its own seed."""
        if self.sampling.seed is None or index == 0:
            return self.sampling
        return dataclasses.replace(self.sampling, seed=(self.sampling.seed + index) % (1 << 64))


def decode_completion(body: dict[str, Any], drafts: Mapping[str, str] | None = None) -> CompletionRequest:
    """A POST /v1/completions body. Extensions: `speculation_length`, `draft_model`, `top_k`, `return_token_ids`,
    `ignore_eos` (vLLM's: generate max_tokens whatever the model makes; what `vllm bench serve --ignore-eos` sends).
    A `speculation_length` without `draft_model` speculates with the draft the gateway pairs with the
    model (`drafts`, target -> draft: `tpcluster serve --draft`)."""
    model = model_name(body)
    prompts = _texts(body.get("prompt"), "prompt")
    for name, off in UNSUPPORTED.items():
        if name in body and body[name] not in off:
            raise bad(name, f"{name} is not supported by this server; leave it out")
    n = _get(body, "n", int, 1)
    if n < 1 or n * len(prompts) > MAX_CHOICES:
        raise bad("n", f"n is {n} for {len(prompts)} prompts; ask for 1 to {MAX_CHOICES} choices in all")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them")
    max_tokens = _get(body, "max_tokens", int, 0)
    temperature = _get(body, "temperature", (int, float), 1.0)  # OpenAI's default: sampling
    top_p = _get(body, "top_p", (int, float), 1.0)
    top_k = _get(body, "top_k", int, 0)
    seed = _get(body, "seed", int)
    k = _get(body, "speculation_length", int, 0)
    draft = _get(body, "draft_model", str, "")
    for name, value in (("max_tokens", max_tokens), ("top_k", top_k), ("seed", seed), ("speculation_length", k)):
        if value is not None and not 0 <= value < (1 << 32 if name != "seed" else 1 << 64):
            raise bad(name, f"{name} {value} is out of range; it must be a non-negative integer")
    if max_tokens > DEFAULTS.max_new_tokens_limit:  # checked here so the message names OpenAI's field
        raise bad("max_tokens", f"max_tokens {max_tokens} is above {DEFAULTS.max_new_tokens_limit}")
    if k and not draft:
        draft = (drafts or {}).get(model, "")
        if not draft:
            raise bad("speculation_length", f"speculation_length needs draft_model: model {model!r} has no draft paired "
                                            "by the gateway (--draft), so name the draft model to speculate with")
    if top_p == 0:
        raise bad("top_p", "top_p 0 keeps no token; use a value in (0, 1]")
    if not 0 < top_p <= 1:  # also NaN; tpcluster.v1's own check would offer 0, which OpenAI does not take
        raise bad("top_p", f"top_p {top_p} is out of range; use a value in (0, 1]")
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, {})
    if options and not stream:
        raise bad("stream_options", "stream_options is only allowed with stream: true")
    request = pb.GenerateRequest(model=model, prompt=prompts[0], max_new_tokens=max_tokens, stop=stops, draft_model=draft,
                                 speculation_length=k, sampling=pb.SamplingParameters(
                                     temperature=temperature, top_p=top_p, top_k=top_k, seed=seed))
    try:
        _, sampling = codec.decode_generate(request)  # the same checks and defaults as tpcluster.v1 Generate
        for prompt in prompts[1:]:
            codec.decode_generate(pb.GenerateRequest(prompt=prompt))
    except InputError as exc:
        raise bad(_param_of(str(exc)), str(exc)) from exc
    if _get(body, "ignore_eos", bool, False):
        sampling = dataclasses.replace(sampling, ignore_eos=True)
    return CompletionRequest(model, prompts, sampling, n, stream, bool(options.get("include_usage")),
                             _get(body, "return_token_ids", bool, False))


def _param_of(message: str) -> str | None:
    """The OpenAI field a tpcluster.v1 check's message is about."""
    for field in ("prompt", "temperature", "top_k", "speculation_length", "stop"):
        if message.startswith(field) or f" {field} " in message:
            return field
    return None


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    texts: list[str]
    base64: bool = False
    dimensions: int | None = None


def decode_embedding(body: dict[str, Any]) -> EmbeddingRequest:
    """A POST /v1/embeddings body (the texts themselves are checked as tpcluster.v1 Embed's)."""
    model = model_name(body)
    texts = _texts(body.get("input"), "input")
    encoding = _get(body, "encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise bad("encoding_format", f"encoding_format {encoding!r} is not one of 'float', 'base64'")
    try:
        texts = codec.decode_texts(texts, "input")
    except InputError as exc:
        raise bad("input", str(exc)) from exc
    dimensions = _get(body, "dimensions", int)
    return EmbeddingRequest(model, texts, encoding == "base64", dimensions)


# -- responses --------------------------------------------------------------------------------
def model_card(model: Any) -> dict[str, Any]:
    """GET /v1/models entry of a served model (actors.gateway.served.ServedModel); `task`,
    `ready` and `max_model_len` are extensions."""
    return {"id": model.name, "object": "model", "created": 0, "owned_by": "tpcluster", "task": model.spec.task,
            "ready": model.pool.ready, "max_model_len": model.max_length}


def embedding_response(request: EmbeddingRequest, vectors: np.ndarray, prompt_tokens: int) -> dict[str, Any]:
    if request.dimensions is not None and request.dimensions != vectors.shape[1]:
        raise bad("dimensions", f"model {request.model!r} gives {vectors.shape[1]} dimensions; "
                                f"leave dimensions out or send {vectors.shape[1]}")
    if request.base64:  # little-endian float32 bytes, as OpenAI's clients decode them
        rows = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        rows = [v.tolist() for v in vectors]
    return {"object": "list", "model": request.model,
            "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def finish_reason(reason: str) -> str:
    """Ours (length, eos, stop, cancelled) as OpenAI's (length, stop)."""
    return "length" if reason in ("length", "cancelled") else "stop"


class CompletionShape:
    """The ids, timestamps and envelope shared by one completion's response or stream chunks, and
    the shape of its choices. A chat completion's (actors.gateway.openai_chat.ChatShape) overrides
    the names and the choices; the routes serve both through these methods."""

    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, model: str) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def envelope(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None,
                 chunk: bool = False) -> dict[str, Any]:
        return {"id": self.id, "object": self.chunk_object if chunk else self.object, "created": self.created,
                "model": self.model, "choices": choices, "usage": usage, "system_fingerprint": None}

    def choice(self, index: int, text: str, reason: str | None, token_ids: list[int] | None = None) -> dict[str, Any]:
        """Choice `index` of the whole (unstreamed) response."""
        return choice(index, text, reason, token_ids)

    def piece(self, index: int, text: str, reason: str | None, token_ids: list[int] | None = None) -> dict[str, Any]:
        """Choice `index` in a stream chunk: a text piece, or (with its reason) the choice's end."""
        return choice(index, text, reason, token_ids)

    def opening(self, count: int) -> list[dict[str, Any]]:
        """The chunks a stream starts with before the first token (none for completions)."""
        return []


def choice(index: int, text: str, reason: str | None, token_ids: list[int] | None = None) -> dict[str, Any]:
    out = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
    if token_ids is not None:
        out["token_ids"] = token_ids
    return out


def usage(stats: list[Any], prompts: int, n: int) -> dict[str, Any]:
    """Token counts of every choice's GenerationStats; each prompt's tokens count once, whatever n.
    `draft_tokens_proposed` / `_accepted` are extensions (0 without speculation)."""
    prompt = sum(s.prompt_tokens for s in stats[::n][:prompts])
    completion = sum(s.generated_tokens for s in stats)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "draft_tokens_proposed": sum(s.draft_tokens_proposed for s in stats),
            "draft_tokens_accepted": sum(s.draft_tokens_accepted for s in stats)}
