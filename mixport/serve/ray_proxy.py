"""Middleware for Ray Serve's HTTP proxy: a request its replica could not finish ends with OpenAI's
error JSON instead of a bare 500 or a stream cut without a word.

When a replica dies (or a request fails inside Ray), the proxy answers a plain "Internal Server
Error" if nothing was sent yet, and closes the connection of a response already under way. This
middleware, around the proxy's ASGI app, notices that the app returned without finishing the
response and then sends:

* nothing sent yet: 503 with ``{"error": {..., "code": "replica_lost"}}`` and ``Retry-After: 1``
  (the openai client retries it; nothing was generated, so a retry is safe);
* a server-sent-event stream under way: a last ``data: {"error": ...}`` event, as the app itself
  ends a stream that fails, which the openai client raises as ``APIError`` with the message.

Ray Serve 2.60 takes proxy middlewares only from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
(``mixport.serve.ray_proxy:middlewares``), read by the proxy's process: ``mixport serve --ray`` sets
it for a local Ray instance; on a cluster, export it where ``ray start`` runs.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mixport.serve.errors import error_body

IMPORT_PATH = "mixport.serve.ray_proxy:middlewares"
ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
LOST = ("Ray Serve could not finish this request: the replica running it stopped or failed (Ray Serve "
        "replaces a replica that died); retry the request")


def middlewares() -> list[Middleware]:
    """The proxy callback: the middlewares Ray Serve's proxy wraps its app with."""
    return [Middleware(ReplicaLost)]


def lost_body() -> dict[str, Any]:
    return error_body(LOST, "server_error", code="replica_lost")


class ReplicaLost:
    """ASGI middleware: finish a response the proxy left unfinished (see the module's docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = {"started": False, "done": False, "sse": False}

        async def watching_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["started"] = True
                kind = dict(message.get("headers", [])).get(b"content-type", b"")
                seen["sse"] = kind.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                seen["done"] = True
            await send(message)

        await self.app(scope, receive, watching_send)
        if seen["done"] or (seen["started"] and not seen["sse"]):
            return
        try:
            await send_lost(send, started=bool(seen["started"]))
        except Exception:  # noqa: BLE001 - the client is gone too: nothing left to tell
            return


async def send_lost(send: Send, started: bool) -> None:
    if not started:
        body = json.dumps(lost_body()).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return
    event = f"data: {json.dumps(lost_body(), separators=(',', ':'))}\n\n".encode()
    await send({"type": "http.response.body", "body": event, "more_body": False})
