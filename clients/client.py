"""Python client of the tpcluster gateway, sync (`Client`) and asyncio (`AsyncClient`).

Depends only on grpc, numpy and the generated protocol. Every call has a deadline (the client's
`timeout`, or the call's); UNAVAILABLE is retried with exponential backoff and full jitter until
that deadline (clients.retry.RetryPolicy), for unary calls and for a Generate stream that has not
yielded anything yet (one that has is never replayed: its tokens were already seen). An address where
nothing answers is reported within `RetryPolicy.unreachable_s` unless the client reached a gateway
there before (then it is a restart, ridden out like a rebuild). Errors are the typed tree in
clients.errors.

Each RPC's request and the decoding of its reply are written once, as an `_Rpc` built by the
shared `_Base` methods; the two classes differ only in how they call the stub and wait.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable, Iterator, Mapping, NamedTuple, Sequence

import grpc
import numpy as np

from clients.errors import TpClusterError, Unavailable, from_rpc_error
from clients.protocol import inference_pb2 as pb
from clients.protocol import inference_pb2_grpc as pb_grpc
from clients.protocol.tensors import from_tensor, to_tensor
from clients.retry import RetryPolicy

WAIT_NOTICE_S = 3.0  # a call still retrying after this long tells `on_wait` (then every NOTICE_EVERY_S)
NOTICE_EVERY_S = 10.0
# What gRPC says when no connection could be made at all (nothing listens, the name does not resolve):
# the server never saw the call, as opposed to a gateway that answered UNAVAILABLE itself.
_UNREACHABLE = ("failed to connect to all addresses", "errors resolving", "dns resolution failed")


@dataclass
class GenerateStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reason: str = ""
    draft_tokens_proposed: int = 0
    draft_tokens_accepted: int = 0
    acceptance_rate: float = 0.0
    mean_accepted_length: float = 0.0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0
    tokens_per_second: float = 0.0


@dataclass
class Generation:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    stats: GenerateStats | None = None


def _add_event(result: Generation, event: pb.GenerateResponse) -> None:
    """Fold one streamed event (a token, or the closing stats) into `result`."""
    if event.HasField("token"):
        result.text += event.token.text
        result.token_ids.append(event.token.id)
    else:
        result.stats = GenerateStats(**{f: getattr(event.stats, f) for f in GenerateStats.__dataclass_fields__})


class _Rpc(NamedTuple):
    """One unary call: the Inference stub's method, its request, and how its reply becomes the result."""

    method: str
    request: Any
    parse: Callable[[Any], Any]
    timeout: float | None = None


@dataclass
class _Call:
    """One call's retries: its deadline, when it started, how many retries so far, its last retried error."""

    deadline: float
    started: float = field(default_factory=time.monotonic)
    retries: int = 0
    last: TpClusterError | None = None
    noticed: float | None = None


def _unreachable(exc: grpc.RpcError) -> bool:
    """Whether `exc` says no connection to the server could be made (the call never reached it)."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    return code == grpc.StatusCode.UNAVAILABLE and details.lower().startswith(_UNREACHABLE)


def _classify_inputs(inputs: Sequence[str | tuple[str, str]]) -> list[pb.TextInput]:
    return [pb.TextInput(text=i) if isinstance(i, str) else pb.TextInput(text=i[0], text_pair=i[1]) for i in inputs]


def _generate_request(prompt: str, model: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                      seed: int | None, stop: Sequence[str], draft_model: str, speculation_length: int) -> pb.GenerateRequest:
    sampling = pb.SamplingParameters(temperature=temperature, top_k=top_k, top_p=top_p)
    if seed is not None:
        sampling.seed = seed
    return pb.GenerateRequest(model=model, prompt=prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                              stop=list(stop), draft_model=draft_model, speculation_length=speculation_length)


def _health_status(reply: Any) -> str:
    from grpc_health.v1 import health_pb2

    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _health_check(channel: Any, service: str, timeout: float, metadata: Any) -> Any:
    """The Check call on `channel` (its reply, or an awaitable of it on an aio channel)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                    timeout=timeout, metadata=metadata)


def _channel_args(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_permit_without_calls", 1)]


class _Base:
    """What both clients share: the channel's settings, every RPC's request and reply decoding,
    and the retry decision. Subclasses set `_channels` (grpc or grpc.aio) and do the calling.

    `timeout` is each call's deadline in seconds, retries included; `retry` says what is retried
    (default: UNAVAILABLE, until the deadline); `retries`, if given, caps the number of retries
    (0: none) on top of `retry`; `on_wait`, if given, is told (one line of text) when a call has
    been retrying for WAIT_NOTICE_S, and every NOTICE_EVERY_S after."""

    _channels: Any

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None, root_certificates: bytes | None = None,
                 timeout: float = 60.0, retry: RetryPolicy | None = None, retries: int | None = None,
                 max_message_bytes: int = 64 << 20, on_wait: Callable[[str], None] | None = None) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout is each call's deadline in seconds and must be > 0, got {timeout}")
        self.target = target
        self.timeout = timeout
        self.retry = replace(retry or RetryPolicy(), **({} if retries is None else {"max_retries": retries}))
        self._random = random.Random()
        self._on_wait = on_wait
        self._reached = False  # whether any call has reached the server (it answered, even with an error)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._tls = root_certificates
        self._options = _channel_args(max_message_bytes)
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates)
            self._channel = self._channels.secure_channel(target, credentials, options=self._options)
        else:
            self._channel = self._channels.insecure_channel(target, options=self._options)
        self._stub = pb_grpc.InferenceStub(self._channel)

    def _call(self, timeout: float | None) -> _Call:
        """A new call given `timeout` seconds (None: the client's), retries included."""
        return _Call(time.monotonic() + (timeout or self.timeout))

    def _nothing_answers(self, error: TpClusterError) -> Unavailable:
        return Unavailable(f"nothing answers at {self.target} ({error.details}); start a gateway there "
                           f"(`tpcluster serve`), or point the client at one (--target HOST:PORT)", error.code)

    def _retry_delay(self, exc: grpc.RpcError, call: _Call) -> float:
        """Seconds to wait before the next try of a failed call; raises its typed error when it is
        not retried (not a retryable status, retries used up, no time left, or nothing answers at
        the address). A deadline that passes while a retried error repeats reports that error."""
        error, now = from_rpc_error(exc), time.monotonic()
        unreachable = _unreachable(exc)
        self._reached |= not unreachable
        if error.code == grpc.StatusCode.DEADLINE_EXCEEDED and call.last is not None:
            last = call.last
            raise type(last)(f"{last.details} (retried for {now - call.started:.1f} s, until the call's deadline)",
                             last.code) from exc
        patience = None if self._reached or not unreachable else self.retry.unreachable_s
        if patience is not None and now - call.started >= patience:
            raise self._nothing_answers(error) from exc
        delay = self.retry.next_delay(error.code, call.retries, call.deadline - now, self._random)
        if delay is None:
            raise (self._nothing_answers(error) if patience is not None else error) from exc
        if patience is not None:  # try again no later than the end of the patience, to report it then
            delay = min(delay, call.started + patience - now)
        call.retries, call.last = call.retries + 1, error
        self._tell_waiting(call, error, now)
        return delay

    def _tell_waiting(self, call: _Call, error: TpClusterError, now: float) -> None:
        if self._on_wait is None or now - call.started < WAIT_NOTICE_S:
            return
        if call.noticed is not None and now - call.noticed < NOTICE_EVERY_S:
            return
        call.noticed = now
        self._on_wait(f"{self.target} answers {error.code.name} ({error.details}); waited {now - call.started:.0f} s, "
                      f"retrying for up to {call.deadline - now:.0f} s more")

    def _health_error(self, exc: grpc.RpcError) -> TpClusterError:
        error = from_rpc_error(exc)
        return self._nothing_answers(error) if _unreachable(exc) and not self._reached else error

    def _invoke(self, rpc: _Rpc, deadline: float) -> Any:
        """The stub call of `rpc` (its reply, or an awaitable of it on an aio channel)."""
        return getattr(self._stub, rpc.method)(rpc.request, timeout=max(deadline - time.monotonic(), 0.0),
                                               metadata=self._metadata)

    def _start_generate(self, request: pb.GenerateRequest, deadline: float) -> Any:
        return self._stub.Generate(request, timeout=max(deadline - time.monotonic(), 0.0), metadata=self._metadata)

    @staticmethod
    def _list_models() -> _Rpc:
        return _Rpc("ListModels", pb.ListModelsRequest(), lambda reply: list(reply.models))

    @staticmethod
    def _get_model(model: str) -> _Rpc:
        return _Rpc("GetModel", pb.GetModelRequest(model=model), lambda reply: reply)

    @staticmethod
    def _status() -> _Rpc:
        return _Rpc("GetStatus", pb.GetStatusRequest(), lambda reply: reply)

    @staticmethod
    def _embed(texts: Sequence[str], model: str, timeout: float | None) -> _Rpc:
        return _Rpc("Embed", pb.EmbedRequest(model=model, texts=list(texts)),
                    lambda reply: np.array([e.values for e in reply.embeddings], dtype=np.float32), timeout)

    @staticmethod
    def _classify(inputs: Sequence[str | tuple[str, str]], model: str, timeout: float | None) -> _Rpc:
        return _Rpc("Classify", pb.ClassifyRequest(model=model, inputs=_classify_inputs(inputs)),
                    lambda reply: list(reply.results), timeout)

    @staticmethod
    def _infer(model: str, inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray], timeout: float | None) -> _Rpc:
        named = inputs.items() if isinstance(inputs, Mapping) else ((f"input_{i}", a) for i, a in enumerate(inputs))
        request = pb.InferRequest(model=model, inputs=[to_tensor(name, a) for name, a in named])
        return _Rpc("Infer", request, lambda reply: [from_tensor(t) for t in reply.outputs], timeout)

    @staticmethod
    def _tokenize(texts: Sequence[str], model: str, timeout: float | None) -> _Rpc:
        return _Rpc("Tokenize", pb.TokenizeRequest(model=model, texts=list(texts)),
                    lambda reply: [list(row.ids) for row in reply.token_ids], timeout)

    @staticmethod
    def _detokenize(token_ids: Sequence[Sequence[int]], model: str, skip_special_tokens: bool, timeout: float | None) -> _Rpc:
        request = pb.TokenizeRequest(model=model, token_ids=[pb.TokenIds(ids=list(row)) for row in token_ids],
                                     skip_special_tokens=skip_special_tokens)
        return _Rpc("Tokenize", request, lambda reply: list(reply.texts), timeout)


class Client(_Base):
    """Blocking client: `with Client("127.0.0.1:50051") as c: c.embed(["text"])`."""

    _channels = grpc

    def _unary(self, rpc: _Rpc) -> Any:
        call = self._call(rpc.timeout)
        while True:
            try:
                reply = self._invoke(rpc, call.deadline)
            except grpc.RpcError as exc:
                time.sleep(self._retry_delay(exc, call))
            else:
                self._reached = True
                return rpc.parse(reply)

    def list_models(self) -> list[pb.ModelMetadata]:
        return self._unary(self._list_models())

    def get_model(self, model: str) -> pb.ModelMetadata:
        return self._unary(self._get_model(model))

    def status(self) -> pb.StatusResponse:
        return self._unary(self._status())

    def embed(self, texts: Sequence[str], model: str = "", timeout: float | None = None) -> np.ndarray:
        return self._unary(self._embed(texts, model, timeout))

    def classify(self, inputs: Sequence[str | tuple[str, str]], model: str = "", timeout: float | None = None) -> list[pb.Classification]:
        return self._unary(self._classify(inputs, model, timeout))

    def infer(self, model: str, inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray],
              timeout: float | None = None) -> list[np.ndarray]:
        """The model's outputs, in ModelMetadata.outputs' order; `inputs` by position, or by name (a dict)."""
        return self._unary(self._infer(model, inputs, timeout))

    def tokenize(self, texts: Sequence[str], model: str = "", timeout: float | None = None) -> list[list[int]]:
        """Token ids of each text, with the special tokens the model's requests add."""
        return self._unary(self._tokenize(texts, model, timeout))

    def detokenize(self, token_ids: Sequence[Sequence[int]], model: str = "", skip_special_tokens: bool = False,
                   timeout: float | None = None) -> list[str]:
        """The text of each row of token ids."""
        return self._unary(self._detokenize(token_ids, model, skip_special_tokens, timeout))

    def generate_stream(self, prompt: str, model: str = "", max_new_tokens: int = 0, temperature: float = 0.0,
                        top_k: int = 0, top_p: float = 0.0, seed: int | None = None, stop: Sequence[str] = (),
                        draft_model: str = "", speculation_length: int = 0, timeout: float | None = None) -> Iterator[pb.GenerateResponse]:
        """Yields GenerateResponse messages: tokens as they come, then the stats. A 0 (max_new_tokens,
        top_p, speculation_length) asks for the server's default, as the proto says. A stream that
        fails before its first message is retried like a unary call; one that fails later is not."""
        request = _generate_request(prompt, model, max_new_tokens, temperature, top_k, top_p, seed, stop, draft_model,
                                    speculation_length)
        attempts = self._call(timeout)
        while True:
            call, started = self._start_generate(request, attempts.deadline), False
            try:
                for event in call:
                    started = self._reached = True
                    yield event
                return
            except grpc.RpcError as exc:
                if started:
                    raise from_rpc_error(exc) from exc
                delay = self._retry_delay(exc, attempts)
            finally:
                call.cancel()  # a consumer that stops early frees the slot on the gateway
            time.sleep(delay)

    def generate(self, prompt: str, **kwargs: Any) -> Generation:
        result = Generation()
        for event in self.generate_stream(prompt, **kwargs):
            _add_event(result, event)
        return result

    def health(self, service: str = "") -> str:
        try:
            reply = _health_check(self._channel, service, self.timeout, self._metadata)
        except grpc.RpcError as exc:
            raise self._health_error(exc) from exc
        return _health_status(reply)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client with the same methods as Client (awaitable; generate_stream is an async iterator)."""

    _channels = grpc.aio

    async def _unary(self, rpc: _Rpc) -> Any:
        call = self._call(rpc.timeout)
        while True:
            try:
                reply = await self._invoke(rpc, call.deadline)
            except grpc.RpcError as exc:
                await asyncio.sleep(self._retry_delay(exc, call))
            else:
                self._reached = True
                return rpc.parse(reply)

    async def list_models(self) -> list[pb.ModelMetadata]:
        return await self._unary(self._list_models())

    async def get_model(self, model: str) -> pb.ModelMetadata:
        return await self._unary(self._get_model(model))

    async def status(self) -> pb.StatusResponse:
        return await self._unary(self._status())

    async def embed(self, texts: Sequence[str], model: str = "", timeout: float | None = None) -> np.ndarray:
        return await self._unary(self._embed(texts, model, timeout))

    async def classify(self, inputs: Sequence[str | tuple[str, str]], model: str = "", timeout: float | None = None) -> list[pb.Classification]:
        return await self._unary(self._classify(inputs, model, timeout))

    async def infer(self, model: str, inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray],
                    timeout: float | None = None) -> list[np.ndarray]:
        return await self._unary(self._infer(model, inputs, timeout))

    async def tokenize(self, texts: Sequence[str], model: str = "", timeout: float | None = None) -> list[list[int]]:
        return await self._unary(self._tokenize(texts, model, timeout))

    async def detokenize(self, token_ids: Sequence[Sequence[int]], model: str = "", skip_special_tokens: bool = False,
                         timeout: float | None = None) -> list[str]:
        return await self._unary(self._detokenize(token_ids, model, skip_special_tokens, timeout))

    async def generate_stream(self, prompt: str, model: str = "", max_new_tokens: int = 0, temperature: float = 0.0,
                              top_k: int = 0, top_p: float = 0.0, seed: int | None = None, stop: Sequence[str] = (),
                              draft_model: str = "", speculation_length: int = 0,
                              timeout: float | None = None) -> AsyncIterator[pb.GenerateResponse]:
        """Yields GenerateResponse messages: tokens as they come, then the stats; retried only
        before the first message, as in Client.generate_stream."""
        request = _generate_request(prompt, model, max_new_tokens, temperature, top_k, top_p, seed, stop, draft_model,
                                    speculation_length)
        attempts = self._call(timeout)
        while True:
            call, started = self._start_generate(request, attempts.deadline), False
            try:
                async for event in call:
                    started = self._reached = True
                    yield event
                return
            except grpc.RpcError as exc:
                if started:
                    raise from_rpc_error(exc) from exc
                delay = self._retry_delay(exc, attempts)
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def generate(self, prompt: str, **kwargs: Any) -> Generation:
        result = Generation()
        async for event in self.generate_stream(prompt, **kwargs):
            _add_event(result, event)
        return result

    async def health(self, service: str = "") -> str:
        try:
            reply = await _health_check(self._channel, service, self.timeout, self._metadata)
        except grpc.RpcError as exc:
            raise self._health_error(exc) from exc
        return _health_status(reply)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


__all__ = ["AsyncClient", "Client", "GenerateStats", "Generation", "RetryPolicy", "TpClusterError", "from_tensor",
           "to_tensor"]
