"""Continuous batching: requests join and leave the running decode batch between steps.

One thread owns the pipeline's session. Each turn of its loop:

1. drops the rows whose request was cancelled (a client that went away) and frees them;
2. admits queued requests into the free rows and prefills them together in one step (their
   first token is sampled there);
3. runs one decode step for every active row, and finishes the rows that hit EOS, a stop
   string or their token budget, freeing those rows at once.

Rows are ``rows.FastRows`` (the fast ONNX Runtime graph: each row keeps its own KV cache, no
row's cache is recomputed when others join or leave) or ``rows.SerialRows`` (any other backend:
one request at a time, same API). Every request samples with its own ``Sampler`` (its own seeded
generator), so a result does not depend on what else is in the batch.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mixport.errors import RuntimeFailure
from mixport.runtime.generate import check_stops
from mixport.runtime.handle import Closed, Event, Handle, QueueFull
from mixport.runtime.rows import rows_for
from mixport.runtime.sampling import Sampler, SamplingConfig, short
from mixport.runtime.streaming import TextStream

if TYPE_CHECKING:
    from mixport.runtime.api import Pipeline

__all__ = ["Closed", "Event", "Handle", "Job", "Metrics", "QueueFull", "Scheduler"]

# V vocab


@dataclass(frozen=True)
class Job:
    """One request: prompt token ids, budget, sampling, stop strings, whether to report logprobs."""

    prompt: list[int]
    max_new_tokens: int = 16
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()
    logprobs: bool = False


class Metrics(Protocol):
    """Optional observer, called from the scheduler's thread (must not block)."""

    def on_queue(self, depth: int) -> None: ...
    def on_step(self, kind: str, active: int, max_batch: int, seconds: float) -> None: ...
    def on_first_token(self, seconds: float) -> None: ...
    def on_token(self, seconds: float) -> None: ...
    def on_finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None: ...


@dataclass
class _Live:
    """A request that holds a row: what its next step needs."""

    handle: Handle
    job: Job
    steps: int  # tokens it may still produce in all
    sampler: Sampler
    text: TextStream
    seen: list[int]
    row: int = -1
    last: float = 0.0  # time of its previous token
    made: int = 0


def _positive(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RuntimeFailure(f"invalid {name}", given=short(value), expected=f"an integer >= {low}")
    return value


class Scheduler:
    """Continuous batching over a loaded Pipeline (see the module docstring). Holds the pipeline
    for its whole life: the pipeline's own generate() waits until ``close()``."""

    def __init__(self, pipeline: Pipeline, max_batch: int = 8, max_queue: int = 64,
                 metrics: Metrics | None = None) -> None:
        _positive("max_batch", max_batch, 1)
        self.max_queue = _positive("max_queue", max_queue, 0)
        self.pipe, self.metrics = pipeline, metrics
        pipeline._check_open()
        pipeline._busy.lock.acquire()  # the session is the scheduler's until close()
        self.rows = rows_for(pipeline.session, max_batch, pipeline.pad_id)
        self.max_batch = min(max_batch, self.rows.max_rows) if self.rows.batched else 1
        self.batched = self.rows.batched
        self.eos = set(pipeline.eos_ids())
        self._cond = threading.Condition()
        self._queue: deque[_Live] = deque()
        self._live: dict[int, _Live] = {}  # row -> request
        self._closing = self._stopped = False
        self._admitting = 0
        self._release, self._released, self._drained = threading.Lock(), False, False
        self._typical = 1.0  # seconds a request takes, a moving average
        self._ids = 0
        self._thread = threading.Thread(target=self._loop, name="mixport-scheduler", daemon=True)
        self._thread.start()

    # ---- the caller's side -------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return len(self._live)

    def submit(self, job: Job) -> Handle:
        """Queue a request; its Handle yields Events. Refuses a bad job (RuntimeFailure), a full
        queue (QueueFull, with ``retry_after``) and a closing scheduler (Closed) at once."""
        live = self._prepare(job)
        with self._cond:
            if self._closing:
                raise Closed("the server is shutting down", given="a new request",
                             expected="requests before shutdown", hint="retry on another replica")
            free = self.max_batch - len(self._live)
            if len(self._queue) >= self.max_queue + max(free, 0):
                raise QueueFull("the request queue is full", given=f"{len(self._queue)} waiting",
                                expected=f"at most {self.max_queue} waiting (--max-queue)",
                                hint="retry after a moment", retry_after=self._retry_after())
            self._ids += 1
            live.handle.id = self._ids
            self._queue.append(live)
            self._observe("on_queue", len(self._queue))
            self._cond.notify_all()
        return live.handle

    def _prepare(self, job: Job) -> _Live:
        if not isinstance(job, Job):
            raise RuntimeFailure("submit() takes a Job", given=type(job).__name__, expected="Job(prompt=[...])")
        self.pipe.check([job.prompt], job.max_new_tokens)  # ids, empty, context, budget: as generate()
        context = self.pipe.context
        stops = check_stops(job.stop if isinstance(job.stop, str) else list(job.stop))  # one string: one stop
        if not isinstance(job.sampling, SamplingConfig):
            raise RuntimeFailure("invalid sampling", given=type(job.sampling).__name__, expected="SamplingConfig")
        steps = min(job.max_new_tokens, context - len(job.prompt))
        handle = Handle(len(job.prompt), self)
        decode = self.pipe.decode if self.pipe.tokenizer is None else self.pipe.tokenizer.decode
        return _Live(handle, job, steps, Sampler(job.sampling), TextStream(decode, stops), list(job.prompt))

    def _retry_after(self) -> float:
        """Seconds until a row is likely free: the queue ahead drains ``max_batch`` requests at a time,
        each taking about as long as the recent ones (1 s before any has finished)."""
        rounds = (len(self._queue) + 1) / self.max_batch
        return float(max(1, math.ceil(rounds * self._typical)))

    def _cancelled(self) -> None:
        """A handle was cancelled: wake the loop so its row is freed before the next step."""
        with self._cond:
            self._cond.notify_all()

    def close(self, drain_timeout: float | None = 30.0) -> bool:
        """Stop accepting; let queued and running requests finish within ``drain_timeout``
        seconds (None: wait for all), then end the rest with an error. True when all finished.
        Safe to call again, or from two threads at once (the first one to give up decides)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            end = None if drain_timeout is None else time.monotonic() + drain_timeout
            while not self._stopped and (self._queue or self._live or self._admitting):
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            if not self._stopped:
                self._drained = not (self._queue or self._live or self._admitting)
                self._stopped = True
                self._cond.notify_all()
        self._thread.join()
        with self._release:  # the pipeline is released once
            if not self._released:
                self._released = True
                self.pipe._busy.lock.release()
        return self._drained

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the scheduler's thread ----------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._queue and not self._live:
                    self._cond.wait()
                if self._stopped:
                    break
                self._drop_cancelled()
                newcomers = self._admit()
                self._admitting = len(newcomers)  # neither queued nor live until prefilled
            if newcomers:
                self._prefill(newcomers)
            with self._cond:
                self._admitting = 0
            if self._live:
                self._decode()
            with self._cond:
                self._cond.notify_all()  # close() waits for the batch to empty
        self._end_all("the server shut down before this request finished")

    def _drop_cancelled(self) -> None:
        for live in [q for q in self._queue if q.handle.cancelled]:
            self._queue.remove(live)
            self._finish(live, "cancelled", free=False)
        for live in [v for v in self._live.values() if v.handle.cancelled]:
            self._finish(live, "cancelled")

    def _admit(self) -> list[_Live]:
        free = self.max_batch - len(self._live)
        newcomers = [self._queue.popleft() for _ in range(min(free, len(self._queue)))]
        if newcomers:
            self._observe("on_queue", len(self._queue))
        return newcomers

    def _prefill(self, newcomers: list[_Live]) -> None:
        start = time.perf_counter()
        try:
            rows, logits = self.rows.prefill([live.job.prompt for live in newcomers])
        except RuntimeFailure as exc:
            for live in newcomers:
                self._finish(live, "error", free=False, error=str(exc))
            return
        self._observe("on_step", "prefill", len(self._live) + len(newcomers), self.max_batch,
                      time.perf_counter() - start)
        for live, row, row_logits in zip(newcomers, rows, logits, strict=True):
            live.row = row
            self._live[row] = live
            self._emit(live, row_logits)

    def _decode(self) -> None:
        start = time.perf_counter()
        tokens = {row: live.seen[-1] for row, live in self._live.items()}
        try:
            logits = self.rows.decode(tokens)
        except RuntimeFailure as exc:
            for live in list(self._live.values()):
                self._finish(live, "error", error=str(exc))
            return
        self._observe("on_step", "decode", len(tokens), self.max_batch, time.perf_counter() - start)
        for row, row_logits in logits.items():
            self._emit(self._live[row], row_logits)

    def _emit(self, live: _Live, logits: np.ndarray) -> None:
        """Sample the row's next token, send it, and finish the row when it is done."""
        token = int(live.sampler(logits[None], [live.seen])[0])
        logprob = _logprob(logits, token) if live.job.logprobs else None
        live.seen.append(token)
        live.made += 1
        now = time.monotonic()
        if live.made == 1:
            self._observe("on_first_token", now - live.handle.submitted)
        else:
            self._observe("on_token", now - live.last)
        live.last = now
        live.handle.completion_tokens = live.made  # before the event: a reader of the last one sees it
        piece = live.text.push(token)
        reason = "stop" if token in self.eos or live.text.stopped else "length" if live.made >= live.steps else None
        if reason is None:
            live.handle.push(Event(token, piece, logprob, None))
            return
        live.handle.push(Event(token, piece + live.text.flush(), logprob, reason))
        self._finish(live, reason, pushed=True)

    def _finish(self, live: _Live, reason: str, free: bool = True, error: str | None = None,
                pushed: bool = False) -> None:
        if free and live.row in self._live:
            del self._live[live.row]
            self.rows.free(live.row)
        live.handle.completion_tokens = live.made
        if reason in ("stop", "length"):
            self._typical = 0.8 * self._typical + 0.2 * (time.monotonic() - live.handle.submitted)
        if not pushed:
            live.handle.push(Event(None, "", None, reason, error))
        self._observe("on_finish", reason, live.handle.prompt_tokens, live.made)

    def _end_all(self, message: str) -> None:
        with self._cond:
            waiting = list(self._queue) + list(self._live.values())
            self._queue.clear()
        for live in waiting:
            self._finish(live, "error", error=message)

    def _observe(self, name: str, *args: Any) -> None:
        if self.metrics is None:
            return
        try:
            getattr(self.metrics, name)(*args)
        except Exception:  # noqa: BLE001 - an observer's bug must not stop the batch
            pass


def _logprob(logits: np.ndarray, token: int) -> float:
    z = logits.astype(np.float64)
    top = z.max()
    return float(z[token] - top - np.log(np.exp(z - top).sum()))
