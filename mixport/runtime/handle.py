"""What a submitted request gives back: a Handle that yields Events, to a thread or to asyncio."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from mixport.errors import Closed, QueueFull, RuntimeFailure

__all__ = ["Closed", "Event", "Handle", "QueueFull"]


@dataclass(frozen=True)
class Event:
    """One step of a request: its new token, the newly printable text (stop strings cut, never half
    a UTF-8 character), the token's log-probability when asked, and on the last event ``finish``:
    "stop" (EOS or a stop string), "length" (token budget or context), "cancelled" or "error"."""

    token: int | None
    text: str
    logprob: float | None
    finish: str | None
    error: str | None = None


class Handle:
    """Events of one request, in order, ending with the one whose ``finish`` is set. Iterate it
    (blocking) or ``async for`` it (asyncio); ``cancel()`` frees its batch row within one step."""

    def __init__(self, prompt_tokens: int, owner: Any) -> None:
        self.id = 0
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0
        self.submitted = time.monotonic()
        self.cancelled = False
        self._owner = owner
        self._events: deque[Event] = deque()
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._done = False

    def push(self, event: Event) -> None:
        """Called by the scheduler's thread."""
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()
            loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

    def cancel(self) -> None:
        """The caller no longer wants the rest (e.g. its client disconnected)."""
        if not self.cancelled and not self._done:
            self.cancelled = True
            self._owner._cancelled()

    @property
    def pending(self) -> int:
        """Events produced and not yet consumed."""
        with self._cond:
            return len(self._events)

    def _pop(self) -> Event | None:
        with self._cond:
            if not self._events:
                return None
            event = self._events.popleft()
            self._done = self._done or event.finish is not None
            return event

    def __iter__(self) -> Iterator[Event]:
        while not self._done:
            with self._cond:
                while not self._events:
                    self._cond.wait()
            event = self._pop()
            if event is not None:
                yield event

    async def __aiter__(self) -> AsyncIterator[Event]:
        with self._cond:
            self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        wake = self._wake
        while not self._done:
            event = self._pop()
            if event is None:
                await wake.wait()
                wake.clear()
                continue
            yield event

    def result(self) -> tuple[str, list[int], str]:
        """Wait for the end: (text, token ids, finish reason); an "error" finish raises."""
        text, ids, finish = [], [], ""
        for event in self:
            text.append(event.text)
            if event.token is not None:
                ids.append(event.token)
            if event.finish:
                finish = event.finish
                if finish == "error":
                    raise RuntimeFailure("the request failed", given=event.error)
        return "".join(text), ids, finish
