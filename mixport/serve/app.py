"""The FastAPI app: ``build_app(folder, options)`` loads an export folder, starts its continuous-
batching Scheduler with Prometheus metrics, and returns the app (``mixport serve`` runs it under
uvicorn; a Ray Serve replica builds the same app in its process).

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mixport.runtime.api import GRAPHS, Pipeline
from mixport.runtime.scheduler import Scheduler
from mixport.serve.errors import ApiError, install_handlers
from mixport.serve.generation import answer
from mixport.serve.metrics import ServeMetrics
from mixport.serve.protocol import ChatRequest, CompletionRequest

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


@dataclass
class ServeOptions:
    """How to serve a folder (``mixport serve``'s options; a Ray replica gets the same)."""

    max_batch: int = 8  # rows decoded together
    max_queue: int = 64  # requests waiting for a row; past it: 429
    threads: int | None = None  # ONNX Runtime intra-op threads (None: its default)
    graph: str = "auto"  # ONNX Runtime graph: auto | fast | portable
    drain_timeout: float = 30.0  # SIGTERM: seconds in-flight requests get to finish
    model_name: str | None = None  # /v1/models id (None: the folder's name)

    def __post_init__(self) -> None:
        if self.graph not in GRAPHS:
            raise ValueError(f"graph must be one of {GRAPHS}, got {self.graph!r}")


@dataclass
class ServeState:
    """What the routes share: the pipeline, its scheduler, the metrics, the drain flag."""

    pipeline: Pipeline
    scheduler: Scheduler
    metrics: ServeMetrics
    options: ServeOptions
    model: str
    draining: bool = False
    started: int = field(default_factory=lambda: int(time.time()))
    _drain_thread: threading.Thread | None = None
    _closed: bool = False
    _token_text: dict[int, str] = field(default_factory=dict)

    def check_open(self) -> None:
        if self.draining:
            raise self.closed_error()

    def closed_error(self) -> ApiError:
        return ApiError(503, "the server is shutting down and accepts no new requests", kind="server_error",
                        code="shutting_down")

    def token_text(self, token: int) -> str:
        """A token's own text (logprobs' ``tokens``), cached per id."""
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.pipeline.decode([token])
        return text

    def begin_drain(self) -> None:
        """Stop accepting; in-flight and queued requests get ``drain_timeout`` seconds to finish
        (then the scheduler cancels them). Runs the scheduler's close on a thread: called from a
        signal handler, it must not block the event loop."""
        if self._drain_thread is not None:
            return
        self.draining = True
        self._drain_thread = threading.Thread(target=self.scheduler.close, args=(self.options.drain_timeout,),
                                              name="mixport-drain", daemon=True)
        self._drain_thread.start()

    def close(self) -> None:
        """Stop the scheduler (after the drain, when one began; else at once, cancelling what is
        left) and release the session. Called by the app's shutdown and by the server; once."""
        if self._closed:
            return
        self._closed = self.draining = True
        if self._drain_thread is None:
            self.scheduler.close(0.0)
        else:  # bounded: the scheduler ends what is left at the drain timeout
            self._drain_thread.join()
        self.pipeline.close()


def build_app(folder: Path, options: ServeOptions | None = None) -> FastAPI:
    """Load ``folder`` and return the app serving it (the Scheduler starts here)."""
    from mixport.runtime import load

    options = options or ServeOptions()
    pipeline = load(folder, threads=options.threads, graph=options.graph)
    metrics = ServeMetrics()
    scheduler = pipeline.scheduler(max_batch=options.max_batch, max_queue=options.max_queue, metrics=metrics)
    name = options.model_name or Path(folder).resolve().name
    return create_app(ServeState(pipeline, scheduler, metrics, options, name))


def create_app(state: ServeState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        state.close()

    app = FastAPI(title="mixport", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.mixport = state
    install_handlers(app)
    app.add_middleware(CountResponses, metrics=state.metrics)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await answer(state, body, request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> Response:
        return await answer(state, body, request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": state.model, "object": "model", "created": state.started,
                                            "owned_by": "mixport", "max_model_len": state.pipeline.context}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse(health_body(state), status_code=503 if state.draining else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        state.metrics.sync(state.scheduler.active, state.scheduler.queue_depth)
        return Response(state.metrics.exposition(), media_type=state.metrics.content_type)

    return app


def health_body(state: ServeState) -> dict[str, Any]:
    sched, pipe = state.scheduler, state.pipeline
    return {"status": "draining" if state.draining else "ok", "model": state.model, "backend": pipe.backend,
            "graph": pipe.graph, "active": sched.active, "queue_depth": sched.queue_depth,
            "max_batch": sched.max_batch, "max_queue": state.options.max_queue, "batched": sched.batched}


class CountResponses:
    """ASGI middleware: mixport_requests_total{endpoint, status} for every answer (a pure ASGI
    wrapper, so streaming responses and their disconnects pass through untouched)."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ROUTES else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.on_response(endpoint, int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)
