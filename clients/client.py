"""Python client of the tpcluster gateway, sync (`Client`) and asyncio (`AsyncClient`).

Depends only on grpc, numpy and the generated protocol. Unary calls retry on UNAVAILABLE with
backoff; every call has a deadline; errors are the typed tree in clients.errors.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Sequence

import grpc
import numpy as np

from clients.errors import TpClusterError, Unavailable, from_rpc_error
from clients.protocol import inference_pb2 as pb
from clients.protocol import inference_pb2_grpc as pb_grpc

_DTYPES = {"float32": "<f4", "float16": "<f2", "float64": "<f8", "int64": "<i8", "int32": "<i4", "int16": "<i2",
           "int8": "i1", "uint8": "u1", "bool": "?"}


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


def to_tensor(name: str, array: np.ndarray) -> pb.Tensor:
    array = np.asarray(array)
    dtype = next((k for k, v in _DTYPES.items() if np.dtype(v) == array.dtype.newbyteorder("<") or np.dtype(v) == array.dtype), None)
    if dtype is None:
        raise TypeError(f"dtype {array.dtype} cannot be sent; use one of {sorted(_DTYPES)}")
    return pb.Tensor(name=name, dtype=dtype, shape=list(array.shape), data=np.ascontiguousarray(array.astype(_DTYPES[dtype])).tobytes())


def from_tensor(tensor: pb.Tensor) -> np.ndarray:
    return np.frombuffer(tensor.data, dtype=np.dtype(_DTYPES[tensor.dtype])).reshape(list(tensor.shape)).copy()


def _classify_inputs(inputs: Sequence[str | tuple[str, str]]) -> list[pb.TextInput]:
    return [pb.TextInput(text=i) if isinstance(i, str) else pb.TextInput(text=i[0], text_pair=i[1]) for i in inputs]


def _generate_request(prompt: str, model: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                      seed: int | None, stop: Sequence[str], draft_model: str, speculation_length: int) -> pb.GenerateRequest:
    sampling = pb.SamplingParameters(temperature=temperature, top_k=top_k, top_p=top_p)
    if seed is not None:
        sampling.seed = seed
    return pb.GenerateRequest(model=model, prompt=prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                              stop=list(stop), draft_model=draft_model, speculation_length=speculation_length)


def _stats(message: pb.GenerateStats) -> GenerateStats:
    return GenerateStats(**{f: getattr(message, f) for f in GenerateStats.__dataclass_fields__})


def _channel_args(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_permit_without_calls", 1)]


class _Base:
    def __init__(self, target: str, token: str | None, root_certificates: bytes | None, timeout: float, retries: int,
                 max_message_bytes: int) -> None:
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._tls = root_certificates
        self._options = _channel_args(max_message_bytes)


class Client(_Base):
    """Blocking client: `with Client("127.0.0.1:50051") as c: c.embed(["text"])`."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None, root_certificates: bytes | None = None,
                 timeout: float = 60.0, retries: int = 3, max_message_bytes: int = 64 << 20) -> None:
        super().__init__(target, token, root_certificates, timeout, retries, max_message_bytes)
        if root_certificates is not None:
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options=self._options)
        else:
            self._channel = grpc.insecure_channel(target, options=self._options)
        self._stub = pb_grpc.InferenceStub(self._channel)

    def _unary(self, method: str, request: Any, timeout: float | None = None) -> Any:
        delay = 0.1
        for attempt in range(self.retries + 1):
            try:
                return getattr(self._stub, method)(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if not isinstance(error, Unavailable) or attempt == self.retries:
                    raise error from None
                time.sleep(delay)
                delay *= 2

    def list_models(self) -> list[pb.ModelMetadata]:
        return list(self._unary("ListModels", pb.ListModelsRequest()).models)

    def get_model(self, model: str) -> pb.ModelMetadata:
        return self._unary("GetModel", pb.GetModelRequest(model=model))

    def status(self) -> pb.StatusResponse:
        return self._unary("GetStatus", pb.GetStatusRequest())

    def embed(self, texts: Sequence[str], model: str = "", timeout: float | None = None) -> np.ndarray:
        response = self._unary("Embed", pb.EmbedRequest(model=model, texts=list(texts)), timeout)
        return np.array([e.values for e in response.embeddings], dtype=np.float32)

    def classify(self, inputs: Sequence[str | tuple[str, str]], model: str = "", timeout: float | None = None) -> list[pb.Classification]:
        return list(self._unary("Classify", pb.ClassifyRequest(model=model, inputs=_classify_inputs(inputs)), timeout).results)

    def infer(self, model: str, inputs: Sequence[np.ndarray], timeout: float | None = None) -> list[np.ndarray]:
        request = pb.InferRequest(model=model, inputs=[to_tensor(f"input_{i}", a) for i, a in enumerate(inputs)])
        return [from_tensor(t) for t in self._unary("Infer", request, timeout).outputs]

    def generate_stream(self, prompt: str, model: str = "", max_new_tokens: int = 64, temperature: float = 0.0,
                        top_k: int = 0, top_p: float = 0.0, seed: int | None = None, stop: Sequence[str] = (),
                        draft_model: str = "", speculation_length: int = 0, timeout: float | None = None) -> Iterator[pb.GenerateResponse]:
        """Yields GenerateResponse messages: tokens as they come, then the stats."""
        request = _generate_request(prompt, model, max_new_tokens, temperature, top_k, top_p, seed, stop, draft_model, speculation_length)
        call = self._stub.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()  # a consumer that stops early frees the slot on the gateway

    def generate(self, prompt: str, **kwargs: Any) -> Generation:
        result = Generation()
        for event in self.generate_stream(prompt, **kwargs):
            if event.HasField("token"):
                result.text += event.token.text
                result.token_ids.append(event.token.id)
            else:
                result.stats = _stats(event.stats)
        return result

    def health(self, service: str = "") -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            reply = health_pb2_grpc.HealthStub(self._channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                     timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client with the same methods as Client (awaitable; generate_stream is an async iterator)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None, root_certificates: bytes | None = None,
                 timeout: float = 60.0, retries: int = 3, max_message_bytes: int = 64 << 20) -> None:
        super().__init__(target, token, root_certificates, timeout, retries, max_message_bytes)
        if root_certificates is not None:
            self._channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options=self._options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=self._options)
        self._stub = pb_grpc.InferenceStub(self._channel)

    async def _unary(self, method: str, request: Any, timeout: float | None = None) -> Any:
        delay = 0.1
        for attempt in range(self.retries + 1):
            try:
                return await getattr(self._stub, method)(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if not isinstance(error, Unavailable) or attempt == self.retries:
                    raise error from None
                await asyncio.sleep(delay)
                delay *= 2

    async def list_models(self) -> list[pb.ModelMetadata]:
        return list((await self._unary("ListModels", pb.ListModelsRequest())).models)

    async def embed(self, texts: Sequence[str], model: str = "", timeout: float | None = None) -> np.ndarray:
        response = await self._unary("Embed", pb.EmbedRequest(model=model, texts=list(texts)), timeout)
        return np.array([e.values for e in response.embeddings], dtype=np.float32)

    async def classify(self, inputs: Sequence[str | tuple[str, str]], model: str = "", timeout: float | None = None) -> list[pb.Classification]:
        return list((await self._unary("Classify", pb.ClassifyRequest(model=model, inputs=_classify_inputs(inputs)), timeout)).results)

    async def infer(self, model: str, inputs: Sequence[np.ndarray], timeout: float | None = None) -> list[np.ndarray]:
        request = pb.InferRequest(model=model, inputs=[to_tensor(f"input_{i}", a) for i, a in enumerate(inputs)])
        return [from_tensor(t) for t in (await self._unary("Infer", request, timeout)).outputs]

    async def generate_stream(self, prompt: str, model: str = "", max_new_tokens: int = 64, temperature: float = 0.0,
                              top_k: int = 0, top_p: float = 0.0, seed: int | None = None, stop: Sequence[str] = (),
                              draft_model: str = "", speculation_length: int = 0,
                              timeout: float | None = None) -> AsyncIterator[pb.GenerateResponse]:
        request = _generate_request(prompt, model, max_new_tokens, temperature, top_k, top_p, seed, stop, draft_model, speculation_length)
        call = self._stub.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            async for event in call:
                yield event
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


__all__ = ["AsyncClient", "Client", "GenerateStats", "Generation", "TpClusterError", "from_tensor", "to_tensor"]
