"""One request through the scheduler: prompt -> ids -> Job -> submit -> events -> response.

Streaming answers are server-sent events; the response object cancels its handle however it
ends (finished, client gone, server cancelled it), so a disconnected client's row is freed
within one scheduler step. A non-streaming request watches for its client's disconnect too."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from mixport.errors import RuntimeFailure
from mixport.runtime.scheduler import Closed, Handle, QueueFull
from mixport.serve.errors import ApiError, body_of
from mixport.serve.protocol import ChatRequest, CommonRequest, CompletionRequest, max_new_tokens, refuse
from mixport.serve.responses import DONE, FINISH, Piece, Shape, extend, piece_of, sse, usage

if TYPE_CHECKING:
    from mixport.serve.app import ServeState

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat: up to the context


@dataclass
class Prepared:
    handle: Handle
    shape: Shape
    include_usage: bool
    made: int = 0  # tokens received (counted here: the handle's count may lag its last event)

    def seen(self, token: int | None) -> None:
        self.made += token is not None

    def usage(self) -> dict[str, int]:
        return usage(self.handle.prompt_tokens, self.made)


def prompt_ids(state: ServeState, body: CommonRequest) -> list[int]:
    """The request's prompt as token ids (chat: the tokenizer's template, rendered in Jinja's sandbox)."""
    pipe = state.pipeline
    try:
        if isinstance(body, ChatRequest):
            if pipe.tokenizer is None:
                raise RuntimeFailure("this export has no tokenizer, so it cannot render chat messages",
                                     expected="tokenizer.json with a chat template", hint="use /v1/completions")
            text = pipe.tokenizer.apply_chat_template(body.message_dicts())
            return pipe.tokenizer.encode(text, add_bos=False)
        assert isinstance(body, CompletionRequest)
        return pipe.encode(body.one_prompt())
    except RuntimeFailure as exc:
        raise refuse(exc, "messages" if isinstance(body, ChatRequest) else "prompt") from None


def submit(state: ServeState, body: CommonRequest) -> Prepared:
    """Check the body, encode, submit: ApiError 400 / 429 / 503 on the way."""
    state.check_open()
    body.refuse_unsupported()
    ids = prompt_ids(state, body)
    if isinstance(body, ChatRequest):
        budget, default, want = body.token_budget(), None, body.logprobs
    else:
        assert isinstance(body, CompletionRequest)
        budget, default, want = body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, body.logprobs is not None
    job = body.job(ids, max_new_tokens(budget, len(ids), state.pipeline.context, default), want)
    try:
        handle = state.scheduler.submit(job)
    except QueueFull as exc:
        retry = max(1, math.ceil(exc.retry_after))
        raise ApiError(429, f"the server's queue is full ({state.scheduler.max_batch} running, "
                       f"{state.options.max_queue} waiting); retry after {retry} s", kind="rate_limit_error",
                       code="queue_full", headers={"Retry-After": str(retry)}) from None
    except Closed:
        raise state.closed_error() from None
    except RuntimeFailure as exc:
        raise refuse(exc, "prompt") from None
    endpoint = "chat" if isinstance(body, ChatRequest) else "completions"
    return Prepared(handle, Shape(endpoint, state.model, want), body.include_usage())


def _failed(state: ServeState, error: str | None) -> ApiError:
    if state.draining:
        return ApiError(503, f"the server is shutting down and stopped this request: {error}",
                        kind="server_error", code="shutting_down")
    return ApiError(500, f"generation failed: {error}", kind="server_error")


async def collect(state: ServeState, prep: Prepared, request: Request) -> JSONResponse:
    """Run to the end, then answer one JSON body (the handle is cancelled if the client leaves)."""
    total, finish, error = Piece(), "stop", None
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, prep.handle))
    try:
        async for ev in prep.handle:
            prep.seen(ev.token)
            extend(total, piece_of(ev.text, ev.token, ev.logprob, prep.shape.want_logprobs, state.token_text))
            if ev.finish:
                finish, error = ev.finish, ev.error
    finally:
        watcher.cancel()
        prep.handle.cancel()
    if finish == "error":
        raise _failed(state, error)
    if finish == "cancelled":
        raise ApiError(499, "the request was cancelled", code="cancelled")
    body = prep.shape.whole(total, FINISH[finish], prep.usage())
    return JSONResponse(body)


async def _cancel_on_disconnect(request: Request, handle: Handle) -> None:
    """The body is read already: the next ASGI message is the client's disconnect."""
    with contextlib.suppress(Exception):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                handle.cancel()
                return


async def events(state: ServeState, prep: Prepared) -> AsyncIterator[str]:
    """The SSE body: chunks as the scheduler produces text, a finish chunk, [DONE]."""
    shape, offset = prep.shape, 0
    if shape.endpoint == "chat":
        yield sse(shape.chunk(Piece(), None, role=True))
    async for ev in prep.handle:
        prep.seen(ev.token)
        piece = piece_of(ev.text, ev.token, ev.logprob, shape.want_logprobs, state.token_text)
        if piece.text or piece.tokens:
            yield sse(shape.chunk(piece, None, offset))
            offset += sum(len(t) for t in piece.tokens)
        if ev.finish == "error" or ev.finish == "cancelled":
            yield sse(body_of(_failed(state, ev.error or ev.finish)))
            break
        if ev.finish:
            yield sse(shape.chunk(Piece(), FINISH[ev.finish]))
            if prep.include_usage:
                yield sse(shape.usage_chunk(prep.usage()))
    yield DONE


class EventStream(StreamingResponse):
    """text/event-stream whose handle is cancelled however the response ends (a no-op once finished):
    the client disconnecting cancels the body's task, and with it this call."""

    def __init__(self, state: ServeState, prep: Prepared, **kwargs: Any) -> None:
        super().__init__(events(state, prep), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, **kwargs)
        self.handle = prep.handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.cancel()


async def answer(state: ServeState, body: CommonRequest, request: Request) -> JSONResponse | EventStream:
    prep = submit(state, body)
    if body.stream:
        return EventStream(state, prep)
    return await collect(state, prep, request)
