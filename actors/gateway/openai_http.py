"""The OpenAI-compatible HTTP API, served by uvicorn in the gateway's own asyncio loop.

`GET /v1/models[/{model}]`, `POST /v1/completions` and `POST /v1/chat/completions` (streamed as
server-sent events with `stream`), `POST /v1/embeddings`, and an open `GET /health`. Every route calls
the same ServedModel objects as the gRPC servicers (the batchers, the continuous-batching schedulers,
the replicas), through the gateway's registry; JSON is read and written by actors.gateway.openai_codec
(chat's by actors.gateway.openai_chat, which renders the messages into one prompt). The gateway's bearer
token guards every /v1 route, its TLS certificate serves HTTPS, and its default deadline applies
unless the request sends `X-Request-Timeout: SECONDS`.

    http = OpenAIServer(gateway, port=8000)
    port = await http.start()   # beside `await gateway.start()`
    await http.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import ssl
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from actors.gateway import openai_codec as oc
from actors.gateway.openai_chat import ChatShape, decode_chat
from actors.gateway.served import ServedModel
from cluster.errors import InputError

log = logging.getLogger("tpcluster.gateway")


class Choices:
    """The generations of one completion request (prompts x n), run concurrently on the model's
    schedulers; their events merged in arrival order as (choice index, token, piece), where token
    None is the end of that choice and piece its GenerationStats."""

    def __init__(self, model: ServedModel, draft: ServedModel | None, request: oc.CompletionRequest, timeout: float) -> None:
        self.count = len(request.prompts) * request.n
        self._queue: asyncio.Queue = asyncio.Queue()
        self._buffer: list[tuple[int, Any, Any]] = []
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._pump(p * request.n + j, model.generate(prompt, request.choice_sampling(j), draft, timeout)))
                       for p, prompt in enumerate(request.prompts) for j in range(request.n)]

    async def _pump(self, index: int, stream: AsyncIterator[tuple[int | None, Any]]) -> None:
        try:
            async with contextlib.aclosing(stream):  # a cancelled choice frees its slot at once
                async for token, piece in stream:
                    self._queue.put_nowait((index, token, piece))
        except Exception as exc:  # noqa: BLE001 (handed to the consumer, which maps and logs it)
            self._queue.put_nowait((index, exc, None))

    async def _next(self) -> tuple[int, Any, Any]:
        item = await self._queue.get()
        if isinstance(item[1], BaseException):
            raise item[1]
        return item

    async def started(self) -> None:
        """Wait until every choice produced its first event (so a bad request is an HTTP status,
        not an error in the middle of a stream); raises the first choice's error."""
        seen: set[int] = set()
        while len(seen) < self.count:
            item = await self._next()
            self._buffer.append(item)
            seen.add(item[0])

    async def events(self) -> AsyncIterator[tuple[int, Any, Any]]:
        ended = 0
        while ended < self.count:
            item = self._buffer.pop(0) if self._buffer else await self._next()
            ended += item[1] is None
            yield item

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class OpenAIRoutes:
    """The route handlers over the gateway's models: decode (openai_codec) -> ServedModel -> encode."""

    def __init__(self, gateway: Any, drafts: dict[str, str] | None = None) -> None:
        self.drafts = dict(drafts or {})
        self.registry = gateway.registry
        self.metrics = gateway.metrics
        self.config = gateway.config

    def _timeout(self, request: Request) -> float:
        sent = request.headers.get("x-request-timeout")
        if sent is None:
            return self.config.default_deadline_s
        try:
            seconds = float(sent)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds < float("inf"):
            raise oc.bad(None, f"X-Request-Timeout {sent!r} is not a positive number of seconds")
        return seconds

    async def _json(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > self.config.max_message_bytes:
            raise oc.bad(None, f"request body is {len(raw)} bytes; at most {self.config.max_message_bytes}")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise oc.bad(None, f"request body is not valid JSON ({exc}); send a JSON object") from exc
        if not isinstance(body, dict):
            raise oc.bad(None, "request body must be a JSON object")
        return body

    async def _observed(self, method: str, request: Request, work: Callable[[dict[str, str]], Awaitable[Response]]) -> Response:
        """Around every route: errors to OpenAI's shape and HTTP status (via openai_codec, the one
        mapping), the gateway's request metrics, a JSON log line with a request id."""
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        labels = {"model": ""}
        started = time.perf_counter()
        code = "OK"
        try:
            response = await work(labels)
        except Exception as exc:
            status, body = oc.error_of(exc)
            code = "DEADLINE_EXCEEDED" if status == 504 else getattr(exc, "status", "INTERNAL")
            if status == 500:
                log.exception("request %s %s failed", request_id, method)
            response = JSONResponse(body, status)
        elapsed = time.perf_counter() - started
        self.metrics.requests.labels(method, labels["model"], code).inc()
        self.metrics.latency.labels(method, labels["model"]).observe(elapsed)
        log.info(json.dumps({"request_id": request_id, "method": method, "model": labels["model"], "code": code,
                             "ms": round(elapsed * 1e3, 2)}))
        response.headers["x-request-id"] = request_id
        return response

    async def models(self, request: Request) -> Response:
        async def work(labels):
            return JSONResponse({"object": "list", "data": [oc.model_card(m) for m in self.registry.models.values()]})
        return await self._observed("openai.models", request, work)

    async def model(self, request: Request) -> Response:
        async def work(labels):
            labels["model"] = request.path_params["model"]
            return JSONResponse(oc.model_card(self.registry.get(labels["model"])))
        return await self._observed("openai.model", request, work)

    async def embeddings(self, request: Request) -> Response:
        async def work(labels):
            body = oc.decode_embedding(await self._json(request))
            labels["model"] = body.model
            model = self.registry.get(body.model)
            vectors = await model.embed(body.texts, self._timeout(request))
            tokens = sum(len(ids) for ids in model.tokenizer(body.texts, add_special_tokens=True)["input_ids"])
            return JSONResponse(oc.embedding_response(body, vectors, tokens))
        return await self._observed("openai.embeddings", request, work)

    async def completions(self, request: Request) -> Response:
        async def work(labels):
            body = oc.decode_completion(await self._json(request), self.drafts)
            labels["model"] = body.model
            model = self.registry.get(body.model)
            model.need_task("generate")
            return await self._generate(request, model, body, oc.CompletionShape(body.model))
        return await self._observed("openai.completions", request, work)

    async def chat_completions(self, request: Request) -> Response:
        async def work(labels):
            chat = decode_chat(await self._json(request), self.drafts)
            labels["model"] = chat.model
            model = self.registry.get(chat.model)
            model.need_task("generate")
            body = chat.rendered(model.tokenizer)  # the messages through the model's chat template
            return await self._generate(request, model, body, ChatShape(body.model))
        return await self._observed("openai.chat_completions", request, work)

    async def _generate(self, request: Request, model: ServedModel, body: oc.CompletionRequest,
                        shape: oc.CompletionShape) -> Response:
        """A (chat) completion's choices on the model, as one JSON response or a stream of chunks."""
        draft = model.draft_named(body.sampling.draft_model, self.registry)
        choices = Choices(model, draft, body, self._timeout(request))
        try:
            await choices.started()
        except BaseException:
            await choices.close()
            raise
        if body.stream:
            return StreamingResponse(self._stream(choices, body, shape), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        try:
            return JSONResponse(await self._complete(choices, body, shape))
        finally:
            await choices.close()

    async def _complete(self, choices: Choices, body: oc.CompletionRequest, shape: oc.CompletionShape) -> dict[str, Any]:
        texts = [""] * choices.count
        ids: list[list[int]] = [[] for _ in range(choices.count)]
        stats: list[Any] = [None] * choices.count
        async for index, token, piece in choices.events():
            if token is None:
                stats[index] = piece
            else:
                texts[index] += piece
                ids[index].append(token)
        out = [shape.choice(i, texts[i], oc.finish_reason(stats[i].finish_reason), ids[i] if body.return_token_ids else None)
               for i in range(choices.count)]
        return shape.envelope(out, oc.usage(stats, len(body.prompts), body.n))

    async def _stream(self, choices: Choices, body: oc.CompletionRequest, shape: oc.CompletionShape) -> AsyncIterator[str]:
        """OpenAI's chunks: the shape's opening ones (chat's assistant role), one per text piece, a
        last one per choice with its finish_reason, the usage (with stream_options.include_usage),
        then `data: [DONE]`. An error after the first token comes as an error event (the status
        line has gone)."""
        stats: list[Any] = [None] * choices.count
        try:
            for chunk in shape.opening(choices.count):
                yield _sse(chunk)
            async for index, token, piece in choices.events():
                if token is None:
                    stats[index] = piece
                    yield _sse(shape.envelope([shape.piece(index, "", oc.finish_reason(piece.finish_reason))], chunk=True))
                elif piece or body.return_token_ids:
                    ids = [token] if body.return_token_ids else None
                    yield _sse(shape.envelope([shape.piece(index, piece, None, ids)], chunk=True))
            if body.include_usage:
                yield _sse(shape.envelope([], oc.usage(stats, len(body.prompts), body.n), chunk=True))
        except Exception as exc:
            status, error = oc.error_of(exc)
            if status == 500:
                log.exception("streamed completion failed")
            yield _sse(error)
        finally:
            await choices.close()
        yield _sse("[DONE]")

    async def health(self, request: Request) -> Response:
        ready = self.registry.readiness.ready_models()  # what gRPC health says (actors.gateway.readiness)
        return JSONResponse({"status": "ok" if ready else "unavailable", "ready_models": ready}, 200 if ready else 503)


class BearerAuth:
    """ASGI middleware: every /v1 route needs `Authorization: Bearer <the gateway's token>`."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            sent = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(sent, self.expected):
                body = oc.error_body(401, "missing or wrong bearer token in the Authorization header "
                                          "(send 'Authorization: Bearer <token>'; the openai client's api_key)",
                                     code="invalid_api_key")
                await JSONResponse(body, 401, headers={"www-authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown path, wrong method) in OpenAI's shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = f"{request.method} {request.url.path}: {exc.detail if isinstance(exc, HTTPException) else 'failed'}; " \
              "routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/embeddings"
    return JSONResponse(oc.error_body(status, message), status)


def build_app(gateway: Any, drafts: dict[str, str] | None = None) -> Starlette:
    """The ASGI app over a gateway (actors.gateway.server.Gateway: its registry, metrics and config);
    `drafts` pairs a target model with the draft it speculates with when a request names none."""
    routes = OpenAIRoutes(gateway, drafts)
    middleware = [Middleware(BearerAuth, token=gateway.config.auth_token)] if gateway.config.auth_token else []
    return Starlette(routes=[
        Route("/v1/models", routes.models, methods=["GET"]),
        Route("/v1/models/{model:path}", routes.model, methods=["GET"]),
        Route("/v1/completions", routes.completions, methods=["POST"]),
        Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
        Route("/v1/embeddings", routes.embeddings, methods=["POST"]),
        Route("/health", routes.health, methods=["GET"]),
    ], middleware=middleware, exception_handlers={HTTPException: _http_error})


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the gateway owns the process's signals (serve_forever)
        yield


def _tls_context(cert: bytes, key: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as folder:  # the ssl module loads PEM only from files
        paths = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        for path, data in zip(paths, (cert, key)):
            path.touch(0o600)
            path.write_bytes(data)
        context.load_cert_chain(*paths)
    return context


class OpenAIServer:
    """The HTTP API of a started gateway, on `port` (0: any free port) of the gateway's host;
    `drafts` (target -> draft, both served) are the default drafts of speculative completions."""

    def __init__(self, gateway: Any, port: int, drafts: dict[str, str] | None = None) -> None:
        if not 0 <= port < 65536:
            raise InputError(f"HTTP port {port} is out of range; use 1-65535, or 0 for any free port")
        for target, draft in (drafts or {}).items():
            served = gateway.registry.get(target)  # ModelNotFound names the served models
            paired = served.draft_named(draft, gateway.registry)
            if served.spec.task != "generate" or (not isinstance(paired, str) and paired.spec.task != "generate"):
                raise InputError(f"draft pairing {target}={draft}: both must be decoders (task 'generate')")
        self.gateway = gateway
        self.drafts = dict(drafts or {})
        self.requested_port = port
        self.port: int | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.gateway.config.tls_cert is not None else "http"

    async def start(self) -> int:
        """Bind and serve from this event loop; returns the bound port."""
        config = self.gateway.config
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((config.host, self.requested_port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot serve HTTP on {config.host}:{self.requested_port} ({exc}); pick another --http-port") from exc
        self.port = sock.getsockname()[1]
        server_config = uvicorn.Config(build_app(self.gateway, self.drafts), log_config=None, access_log=False, lifespan="off",
                                       timeout_graceful_shutdown=config.grace_s, server_header=False)
        server_config.load()
        if config.tls_cert is not None:
            server_config.ssl = _tls_context(config.tls_cert, config.tls_key)
        self._server = _Server(server_config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it stopped
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        log.info(json.dumps({"event": "serving_http", "address": f"{self.scheme}://{config.host}:{self.port}"}))
        return self.port

    async def stop(self) -> None:
        """Stop accepting, finish in-flight requests within the gateway's grace period."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
