"""Batch rows for continuous batching: each request owns one row of the KV cache, rows join
(prefill) and leave (free) between decode steps without touching the others' cache.

``FastRows`` (the fast ONNX Runtime graph, ``ort_fast``): one preallocated cache per layer,
``[R, G, C, D]`` for R = max batch rows. GroupQueryAttention reads each row's own length
(``seqlens_k``), so rows of any lengths share a step. Slot management:

* the active rows always occupy the slots ``0..n-1``: a decode step binds the views
  ``cache[:n]`` (contiguous, no copy) and computes n rows, never the empty ones;
* newcomers take the slots ``n..n+k-1`` and are prefilled together in one step over the views
  ``cache[n:n+k]`` (each row starts at length 0, so the stale contents of a slot are never read);
* ``free(row)`` moves the last active slot's cache into the freed slot (``length`` tokens per
  layer, a copy of one row's cache) so the active slots stay ``0..n-1``;
* the capacity C grows by doubling (one copy of the whole cache) when a row would outgrow it.

``PaddedRows`` (the portable graph, ``OrtSession``): left-padded rows over a concatenating cache,
copied when rows join or leave. ``SerialRows`` runs any other Session (TensorRT) one request at a
time.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from mixport.errors import RuntimeFailure
from mixport.runtime.generate import last_logits, left_pad
from mixport.runtime.ort_fast import grown_capacity, run_step
from mixport.runtime.session import Session

# R rows (max batch), n active rows, k newcomers, S prompt length (padded), C capacity, V vocab
MIN_CAPACITY = 256


class Rows(Protocol):
    max_rows: int
    batched: bool  # False: one request at a time

    def prefill(self, prompts: list[list[int]]) -> tuple[list[int], np.ndarray]:
        """Admit prompts (at most max_rows - active): their row ids and last-token logits [k, V]."""
        ...

    def decode(self, tokens: dict[int, int]) -> dict[int, np.ndarray]:
        """One token for every active row (row -> token) -> row -> logits [V]."""
        ...

    def free(self, row: int) -> None: ...


class FastRows:
    """Continuous batching over an OrtFastSession's graph (see the module docstring)."""

    batched = True

    def __init__(self, fast: Any, max_rows: int) -> None:
        self.fast, self.max_rows = fast, max_rows
        self.io = fast.sess.io_binding()
        self.length = np.zeros(max_rows, dtype=np.int64)
        self.slot: dict[int, int] = {}  # row id -> slot
        self.row_at: list[int] = []  # slot -> row id, for the active slots 0..n-1
        self.next_id = 0
        self.capacity = 0
        self.cache: list[np.ndarray] = []
        self._grow(min(MIN_CAPACITY, fast.context))

    @property
    def active(self) -> int:
        return len(self.row_at)

    def _grow(self, capacity: int) -> None:
        f = self.fast
        shape = (self.max_rows, f.kv_heads, capacity, f.head_dim)
        old, self.cache = self.cache, []
        for j in range(2 * f.layers):
            buf = np.zeros(shape, f.dtype)
            if old:
                buf[:, :, :self.capacity] = old[j]
            self.cache.append(buf)
        self.capacity = capacity

    def _run(self, lo: int, ids: np.ndarray, new: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Feed ids [k, S] (right-padded, ``new`` real tokens per row) to the slots lo..lo+k-1."""
        f, hi = self.fast, lo + ids.shape[0]
        total = self.length[lo:hi] + new
        grown = grown_capacity(total, self.capacity, f.context)
        if grown:
            self._grow(grown)
        for i in range(f.layers):
            for j, kv in enumerate(("key", "value")):  # past and present share the slots' view
                view = f._ort.OrtValue.ortvalue_from_numpy(self.cache[2 * i + j][lo:hi])
                self.io.bind_ortvalue_input(f"past_key_values.{i}.{kv}", view)
                self.io.bind_ortvalue_output(f"present.{i}.{kv}", view)
        out = np.empty((index.shape[0], f.vocab), f.dtype)
        run_step(f.sess, self.io, ids, total, index, out)
        self.length[lo:hi] = total
        return out

    def prefill(self, prompts: list[list[int]]) -> tuple[list[int], np.ndarray]:
        lo, k = self.active, len(prompts)
        if lo + k > self.max_rows:
            raise RuntimeFailure("no free batch row", given=f"{k} newcomers, {lo} active",
                                 expected=f"at most {self.max_rows} rows")
        new = np.array([len(p) for p in prompts], dtype=np.int64)
        ids = np.zeros((k, int(new.max())), dtype=np.int64)
        for r, p in enumerate(prompts):
            ids[r, :len(p)] = p
        self.length[lo:lo + k] = 0
        logits = self._run(lo, ids, new, np.arange(k) * ids.shape[1] + new - 1)
        rows = list(range(self.next_id, self.next_id + k))
        self.next_id += k
        for r, row in enumerate(rows):
            self.slot[row] = lo + r
            self.row_at.append(row)
        return rows, logits

    def decode(self, tokens: dict[int, int]) -> dict[int, np.ndarray]:
        if set(tokens) != set(self.row_at):
            raise RuntimeFailure("a decode step must feed every active row", given=sorted(tokens),
                                 expected=sorted(self.row_at))
        n = self.active
        ids = np.array([[tokens[row]] for row in self.row_at], dtype=np.int64)
        logits = self._run(0, ids, np.ones(n, dtype=np.int64), np.arange(n))
        return {row: logits[s] for s, row in enumerate(self.row_at)}

    def free(self, row: int) -> None:
        slot, last = self.slot.pop(row), self.active - 1
        moved = self.row_at.pop()
        if slot != last:  # the last active slot moves into the hole
            keep = int(self.length[last])
            for buf in self.cache:
                buf[slot, :, :keep] = buf[last, :, :keep]
            self.length[slot] = keep
            self.row_at[slot] = moved
            self.slot[moved] = slot
        self.length[last] = 0


class PaddedRows:
    """Continuous batching over the portable graph (``OrtSession``: the cache is the previous step's
    presents, ``[n, heads, P, width]``, with a left-padded attention mask [n, P]).

    A step feeds every active row one token at its own position; rows of different lengths share
    the cache's P columns, the shorter ones left-padded (mask 0). Newcomers are prefilled alone (a
    batch of their own), then their cache is left-padded to the common P (or the others' to theirs)
    and concatenated; a leaving row is dropped and the columns no row uses any more are cut. So the
    cache is copied when rows join or leave, never per decode step, and nobody's is recomputed."""

    batched = True

    def __init__(self, session: Any, max_rows: int, pad_id: int = 0) -> None:
        self.session, self.max_rows, self.pad_id = session, max_rows, pad_id
        self.order: list[int] = []  # row ids in cache order
        self.mask = np.zeros((0, 0), dtype=np.int64)
        self.count = np.zeros(0, dtype=np.int64)  # tokens of each row so far (its next position)
        self.next_id = 0

    @property
    def active(self) -> int:
        return len(self.order)

    def _past(self) -> list[np.ndarray]:
        return [p if isinstance(p, np.ndarray) else p.numpy() for p in self.session.past]

    def prefill(self, prompts: list[list[int]]) -> tuple[list[int], np.ndarray]:
        if self.active + len(prompts) > self.max_rows:
            raise RuntimeFailure("no free batch row", given=f"{len(prompts)} newcomers, {self.active} active",
                                 expected=f"at most {self.max_rows} rows")
        old, old_mask = (self._past(), self.mask) if self.order else ([], None)
        ids, mask, pos = left_pad(prompts, self.pad_id)
        self.session.reset(len(prompts))
        logits = np.asarray(self.session.step(ids, mask, pos))[:, -1]
        new = self._past()
        if old_mask is not None:  # left-pad the shorter side to the common length, then stack
            width = max(old_mask.shape[1], mask.shape[1])
            new = [np.concatenate([_left(a, width), _left(b, width)]) for a, b in zip(old, new, strict=True)]
            mask = np.concatenate([_left(old_mask, width, axis=1), _left(mask, width, axis=1)])
        self.session.past, self.mask = new, mask
        self.count = np.concatenate([self.count, [len(p) for p in prompts]]).astype(np.int64)
        rows = list(range(self.next_id, self.next_id + len(prompts)))
        self.next_id += len(prompts)
        self.order += rows
        return rows, logits

    def decode(self, tokens: dict[int, int]) -> dict[int, np.ndarray]:
        if set(tokens) != set(self.order):
            raise RuntimeFailure("a decode step must feed every active row", given=sorted(tokens),
                                 expected=sorted(self.order))
        ids = np.array([[tokens[row]] for row in self.order], dtype=np.int64)
        mask = np.concatenate([self.mask, np.ones((len(ids), 1), dtype=np.int64)], axis=1)
        logits = np.asarray(self.session.step(ids, mask, self.count[:, None]))[:, -1]
        self.mask, self.count = mask, self.count + 1
        return {row: logits[i] for i, row in enumerate(self.order)}

    def free(self, row: int) -> None:
        i = self.order.index(row)
        self.order.pop(i)
        keep = np.arange(len(self.count)) != i
        self.mask, self.count = self.mask[keep], self.count[keep]
        used = np.flatnonzero(self.mask.any(axis=0))
        first = int(used[0]) if used.size else self.mask.shape[1]
        self.mask = self.mask[:, first:]
        self.session.past = [p[keep][:, :, first:] for p in self._past()]


def _left(a: np.ndarray, width: int, axis: int = 2) -> np.ndarray:
    """``a`` left-padded with zeros along ``axis`` to ``width``."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (width - a.shape[axis], 0)
    return np.pad(a, pad)


class SerialRows:
    """Any Session, one request at a time (``batched`` False): its own KV cache is the one row."""

    batched = False
    max_rows = 1

    def __init__(self, session: Session) -> None:
        self.session = session
        self.row: int | None = None
        self.next_id = 0
        self.mask = self.pos = np.zeros((1, 0), dtype=np.int64)

    @property
    def active(self) -> int:
        return 0 if self.row is None else 1

    def prefill(self, prompts: list[list[int]]) -> tuple[list[int], np.ndarray]:
        if self.row is not None or len(prompts) != 1:
            raise RuntimeFailure("this backend runs one request at a time", given=f"{len(prompts)} newcomers",
                                 expected="one, when no request is running")
        ids = np.array([prompts[0]], dtype=np.int64)
        self.session.reset(1)
        self.mask = np.ones_like(ids)
        self.pos = np.arange(ids.shape[1], dtype=np.int64)[None]
        logits = last_logits(self.session, ids, self.mask, self.pos)
        self.row, self.next_id = self.next_id, self.next_id + 1
        return [self.row], np.asarray(logits)

    def decode(self, tokens: dict[int, int]) -> dict[int, np.ndarray]:
        if self.row is None or set(tokens) != {self.row}:
            raise RuntimeFailure("a decode step must feed every active row", given=sorted(tokens),
                                 expected=[] if self.row is None else [self.row])
        self.mask = np.concatenate([self.mask, np.ones((1, 1), dtype=np.int64)], axis=1)
        self.pos = self.pos[:, -1:] + 1
        logits = last_logits(self.session, np.array([[tokens[self.row]]], dtype=np.int64), self.mask, self.pos)
        return {self.row: np.asarray(logits)[0]}

    def free(self, row: int) -> None:
        if row == self.row:
            self.row = None


def rows_for(session: Session, max_rows: int, pad_id: int = 0) -> FastRows | PaddedRows | SerialRows:
    """Continuous batching where the backend allows it (ONNX Runtime's fast or portable graph),
    else one request at a time (TensorRT: its cache lives on the GPU as torch tensors)."""
    from mixport.runtime.ort_session import OrtSession

    if getattr(session, "graph", None) == "fast" and getattr(session, "sess", None) is not None:
        return FastRows(session, max_rows)
    if isinstance(session, OrtSession):
        return PaddedRows(session, max_rows, pad_id)
    return SerialRows(session)
