"""The OpenAI-compatible HTTP API and the kiosk page, as one Starlette app around one loaded model.

Routes: GET /v1/models, POST /v1/chat/completions and /v1/completions (JSON or server-sent events),
GET /health, GET /metrics, and the chat page at /. Every error is an OpenAI error object with the status
OpenAI would use, so client libraries raise their usual exceptions. The server never opens a connection of
its own: the page's files ship in the package and nothing is fetched at run time.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_runtime.errors import ContextLengthError, EdgeRuntimeError, RequestError
from edge_runtime.model import Model
from edge_runtime.openai_shapes import PreparedRequest, prepare_chat, prepare_completion
from edge_runtime.server.generation_queue import ClientGone, GenerationQueue, QueueFull
from edge_runtime.server.metrics import CONTENT_TYPE, ServerMetrics
from edge_runtime.server.request_schema import BadRequest, GenerationRequest, Limits, parse

log = logging.getLogger("edge_runtime.server")
STATIC = files("edge_runtime.server") / "static"
_OPEN_PATHS = ("/", "/health")
T = TypeVar("T")


@dataclass(frozen=True)
class ServerSettings:
    """What the operator chose: the key (None: no key), the waiting line, per-request limits, prompt caching."""

    api_key: str | None = None
    queue_depth: int = 8
    limits: Limits = field(default_factory=Limits)
    cache_prompt: bool = True  # a request's own `cache_prompt` overrides it
    # LoRA adapters a request may name in `"adapter"` (serve --adapter NAME=DIR), each attached to the model's slots
    # for its generation; a request naming none runs with the adapter the model was loaded with (or none).
    adapters: Mapping[str, Path] = field(default_factory=dict)


def error_response(status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Guard:
    """API key check and request metrics around every request, as plain ASGI so streams pass untouched."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics
        self.key = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.key is not None and not self._allowed(scope):
                response = error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(scope["path"], status, time.perf_counter() - start)

    def _allowed(self, scope: Scope) -> bool:
        path = scope["path"]
        if path in _OPEN_PATHS or path.startswith("/static/"):
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, self.key)


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing more than `limit` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"the request body is {declared} bytes; this server takes at most {limit}",
                         code="request_too_large", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(f"the request body is over {limit} bytes, the most this server takes",
                             code="request_too_large", status=413)
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None


async def _disconnected(request: Request, cancel: threading.Event) -> None:
    """Returns when the client has gone, having told the generation to stop."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel.set()


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


class _Stream:
    """A streamed generation: the generation thread posts chunks to the loop, the response body sends them."""

    _END = object()

    def __init__(self, prepared: PreparedRequest, include_usage: bool, cancel: threading.Event,
                 finished: Callable[[threading.Event], None]):
        self.prepared, self.include_usage, self.cancel, self.finished = prepared, include_usage, cancel, finished
        self.loop = asyncio.get_running_loop()
        self.chunks: asyncio.Queue[Any] = asyncio.Queue()

    def _post(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.chunks.put_nowait, item)

    def work(self) -> None:
        chunks = self.prepared.chunks(self.include_usage, should_stop=self.cancel.is_set)
        try:
            for chunk in chunks:
                self._post(chunk)
        except Exception as exc:  # reported to the client as an error event, and logged
            log.exception("generation failed")
            self._post(exc)
        finally:
            chunks.close()
            self.finished(self.cancel)
            self._post(self._END)

    async def body(self, gone: asyncio.Future[None]) -> AsyncIterator[bytes]:
        try:
            while (chunk := await self.chunks.get()) is not self._END:
                if isinstance(chunk, Exception):
                    chunk = {"error": {"message": f"generation failed: {chunk}", "type": "server_error",
                                       "param": None, "code": None}}
                yield _sse(chunk)
            yield b"data: [DONE]\n\n"
        finally:
            self.cancel.set()
            gone.cancel()


class _Api:
    """The handlers, sharing the model, the generation queue and the metrics."""

    def __init__(self, model: Model, settings: ServerSettings):
        self.model, self.settings = model, settings
        self.queue = GenerationQueue(settings.queue_depth)
        self.metrics = ServerMetrics(lambda: self.queue.waiting, lambda: float(self.queue.busy),
                                     model.context_length)
        self.started = int(time.time())
        self.default_adapter = model.adapter
        self.adapters = {name: model.read_adapter(path) for name, path in settings.adapters.items()}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def one_model(self, request: Request) -> Response:
        if request.path_params["name"] != self.model.name:
            return error_response(404, f"model {request.path_params['name']!r} is not served here; "
                                       f"this server serves {self.model.name!r}", code="model_not_found")
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model.name, "object": "model", "created": self.started, "owned_by": "edge-runtime",
                "context_length": self.model.context_length}

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model.name, "generating": self.queue.busy,
                             "queue_depth": self.queue.waiting, "queue_limit": self.queue.depth})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.text(), media_type=CONTENT_TYPE)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, *, chat: bool) -> Response:
        try:
            params = parse(await _read_json(request, self.settings.limits.max_body_bytes), chat=chat,
                           limits=self.settings.limits)
            adapter = self._adapter(params.adapter)
            prepared = await anyio.to_thread.run_sync(self._prepare, params)
        except BadRequest as exc:
            return error_response(exc.status, exc.message, param=exc.param, code=exc.code)
        except ContextLengthError as exc:
            return error_response(400, str(exc), param="messages" if chat else "prompt",
                                  code="context_length_exceeded")
        except RequestError as exc:
            return error_response(400, str(exc), param=exc.param)
        except EdgeRuntimeError as exc:
            return error_response(400, str(exc))
        except ClientDisconnect:
            return Response(status_code=499)
        cancel = threading.Event()
        gone = asyncio.ensure_future(_disconnected(request, cancel))
        stream = _Stream(prepared, params.include_usage, cancel, self._finished) if params.stream else None
        try:
            work = stream.work if stream else partial(self._collect, prepared, cancel)
            result = await self.queue.run(partial(self._with_adapter, adapter, work), cancel, gone)
        except QueueFull as exc:
            gone.cancel()
            return error_response(429, f"the server is busy: {self.queue.waiting} requests are waiting; "
                                       f"retry in {exc.retry_after} s", kind="rate_limit_error", code="queue_full",
                                  headers={"Retry-After": str(exc.retry_after)})
        except ClientGone:
            return Response(status_code=499)
        if stream:
            return StreamingResponse(stream.body(gone), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        return JSONResponse(result.result()) if result.done() else Response(status_code=499)

    def _adapter(self, name: str | None) -> Path | None:
        """The adapter a request's `adapter` names (None: the model's own), or BadRequest naming the field."""
        if name is None:
            return self.default_adapter
        if name not in self.adapters:
            offered = f"one of {', '.join(sorted(self.adapters))}" if self.adapters else "none (serve --adapter NAME=DIR)"
            raise BadRequest(f"adapter {name!r} is not served here; this server offers {offered}", "adapter")
        return self.adapters[name]

    def _with_adapter(self, adapter: Path | None, work: Callable[[], T]) -> T:
        """Run a generation with its adapter attached: in the queue's turn, so that requests with different
        adapters take turns on the one model and its cache (which switching empties)."""
        self.model.set_adapter(adapter)
        return work()

    def _prepare(self, params: GenerationRequest) -> PreparedRequest:
        prepare = prepare_chat if params.chat else prepare_completion
        return prepare(self.model, params.prompt, **{"cache_prompt": self.settings.cache_prompt, **params.options})

    def _finished(self, cancel: threading.Event) -> None:
        self.metrics.observe_generation(self.model.stats, cancel.is_set())

    def _collect(self, prepared: PreparedRequest, cancel: threading.Event) -> dict[str, Any]:
        try:
            return prepared.result(should_stop=cancel.is_set)
        finally:
            self._finished(cancel)

    async def page(self, request: Request) -> Response:
        return FileResponse(str(STATIC / "index.html"))

    def shutdown(self) -> None:
        self.queue.shutdown()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("request failed", exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")


def create_app(model: Model, settings: ServerSettings | None = None) -> Starlette:
    """The ASGI app serving `model`; `app.state.api` holds the handlers (queue, metrics) for tests and tools."""
    api = _Api(model, settings or ServerSettings())
    routes = [
        Route("/", api.page),
        Route("/health", api.health),
        Route("/metrics", api.metrics_text),
        Route("/v1/models", api.models),
        Route("/v1/models/{name:path}", api.one_model),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        api.shutdown()

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.api = api
    app.add_middleware(_Guard, api_key=api.settings.api_key, metrics=api.metrics)
    return app
