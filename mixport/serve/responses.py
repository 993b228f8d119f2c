"""Response bodies in OpenAI's shapes: completions and chat, whole or as server-sent-event chunks.

A ``Shape`` knows the endpoint's object names and where text and logprobs go; the routes feed it
the scheduler's events. Logprobs are the chosen token's only (completions' ``top_logprobs`` holds
that one token per position; chat's ``top_logprobs`` lists are empty)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mixport.serve.protocol import Endpoint, finite_or_none


@dataclass
class Piece:
    """What one scheduler event adds: text, and the token with its logprob when logprobs were asked."""

    text: str = ""
    tokens: list[str] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)


@dataclass
class Shape:
    endpoint: Endpoint
    model: str
    want_logprobs: bool
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        prefix = "chatcmpl" if self.endpoint == "chat" else "cmpl"
        self.id = self.id or f"{prefix}-{uuid.uuid4().hex}"
        self.created = self.created or int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, piece: Piece, offset: int) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        lps = [finite_or_none(v) for v in piece.logprobs]
        if self.endpoint == "chat":
            return {"content": [{"token": t, "logprob": lp if lp is not None else -9999.0,
                                 "bytes": list(t.encode("utf-8")), "top_logprobs": []}
                                for t, lp in zip(piece.tokens, lps, strict=True)]}
        offsets, at = [], offset
        for t in piece.tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": piece.tokens, "token_logprobs": lps, "text_offset": offsets,
                "top_logprobs": [{t: lp} for t, lp in zip(piece.tokens, lps, strict=True)]}

    def whole(self, piece: Piece, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        """The non-streaming body."""
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs(piece, 0), "finish_reason": finish}
        if self.endpoint == "chat":
            choice["message"] = {"role": "assistant", "content": piece.text}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage}
        choice["text"] = piece.text
        return {**self._head("text_completion"), "choices": [choice], "usage": usage}

    def chunk(self, piece: Piece, finish: str | None, offset: int = 0, role: bool = False) -> dict[str, Any]:
        """One streamed chunk (chat: ``delta``; the first carries the role)."""
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs(piece, offset) if piece.tokens else None,
                                  "finish_reason": finish}
        if self.endpoint == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if piece.text:
                delta["content"] = piece.text
            choice["delta"] = delta
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice["text"] = piece.text
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(body: dict[str, Any] | str) -> str:
    """One server-sent event: ``data: {json}`` (or ``data: [DONE]``) and a blank line."""
    data = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


DONE = sse("[DONE]")


def piece_of(text: str, token: int | None, logprob: float | None, want_logprobs: bool,
             token_text: Callable[[int], str]) -> Piece:
    if not want_logprobs or token is None:
        return Piece(text)
    return Piece(text, [token_text(token)], [logprob])


def extend(total: Piece, piece: Piece) -> None:
    total.text += piece.text
    total.tokens += piece.tokens
    total.logprobs += piece.logprobs


FINISH = {"stop": "stop", "length": "length"}  # cancelled / error never reach a client as a finish reason
