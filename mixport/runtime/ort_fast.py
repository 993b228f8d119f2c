"""The fast ONNX Runtime session: the ORT-target graph (ort_graph) with a preallocated,
in-place KV cache bound through IOBinding. Nothing is copied or re-planned per step
except the few int inputs; logits land in a preallocated buffer.

Rows are stored left-aligned: row b's tokens occupy cache slots 0..len_b-1 (the left
padding the generation loop uses is dropped on the way in), so GroupQueryAttention
sees per-row lengths (seqlens_k) instead of a mask, and positions follow from the
slots (position_ids, which the loop sets to the same values, are not fed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mixport.artifact import Manifest
from mixport.errors import RuntimeFailure
from mixport.runtime import memory, onnx_locate, ort_qmoe
from mixport.runtime.ort_session import open_session, quant_config, run_failure

# B batch, S new tokens, C capacity, G kv heads, D head dim, V vocab

MIN_CAPACITY = 256


class OrtFastSession:
    """Session over model.ort.onnx (see ort_graph). Implements Session plus the optional
    ``reserve(capacity)`` and ``step_last(...) -> [B, V]``."""

    backend = "onnxruntime"
    graph = "fast"

    def __init__(self, model_path: Path, manifest: Manifest, device: str = "cpu",
                 threads: int | None = None, accuracy_level: int | None = None) -> None:
        import onnxruntime as ort

        self._ort = ort
        memory.require(Path(model_path).with_name("model.onnx"), manifest.dtype, device)  # the bytes it points at
        folder, proto = Path(model_path).parent, onnx_locate.skeleton(model_path)
        self.shared = ort_qmoe.mapped_parts(folder, ort_qmoe.parts_of(proto), proto)  # in place, for the session
        del proto
        self.sess = open_session(model_path, device, threads, quant_config(manifest, accuracy_level),
                                 shared=self.shared)
        ort_qmoe.release(self.shared)  # packed by now: their file pages leave this process
        memory.give_back()
        cfg = manifest.config
        self.layers, self.kv_heads, self.head_dim = (cfg["num_hidden_layers"], cfg["num_key_value_heads"],
                                                     cfg["head_dim"])
        self.vocab, self.context = cfg["vocab_size"], cfg["max_position_embeddings"]
        self.dtype = np.float16 if manifest.dtype == "fp16" else np.float32
        self.io = self.sess.io_binding()
        self.cache: list[Any] = []
        self.lengths = np.zeros(0, dtype=np.int64)
        self.capacity = 0
        self.logits = np.zeros((0, self.vocab), self.dtype)
        self.past_len = 0

    def reset(self, batch: int) -> None:
        self.lengths = np.zeros(batch, dtype=np.int64)
        self.past_len = 0
        self.logits = np.zeros((batch, self.vocab), self.dtype)
        self._allocate(batch, min(max(self.capacity, MIN_CAPACITY), self.context))

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` tokens per row (the cache otherwise grows by doubling)."""
        if capacity > self.capacity:
            self._allocate(len(self.lengths), min(capacity, self.context))

    def _allocate(self, batch: int, capacity: int) -> None:
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        old = [c.numpy() for c in self.cache] if self.past_len else []
        self.cache = []
        for j in range(2 * self.layers):
            buf = np.zeros(shape, self.dtype)
            if old and old[j].shape[0] == batch:
                buf[:, :, :old[j].shape[2]] = old[j]
            self.cache.append(self._ort.OrtValue.ortvalue_from_numpy(buf))
        self.capacity = capacity
        for i in range(self.layers):
            for j, kv in enumerate(("key", "value")):  # past and present share one buffer
                self.io.bind_ortvalue_input(f"past_key_values.{i}.{kv}", self.cache[2 * i + j])
                self.io.bind_ortvalue_output(f"present.{i}.{kv}", self.cache[2 * i + j])
        self.io.bind_output("logits", "cpu", 0, self.dtype, list(self.logits.shape), self.logits.ctypes.data)

    def _compact(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ids [B, S] -> right-padded ids [B, S] and the new tokens per row [B]."""
        s = input_ids.shape[1]
        new = np.maximum(np.asarray(attention_mask)[:, -s:].sum(axis=1), 1).astype(np.int64)  # done rows too
        if (new == s).all():
            return np.ascontiguousarray(input_ids, dtype=np.int64), new
        ids = np.zeros_like(input_ids, dtype=np.int64)
        for row, n in enumerate(new):
            ids[row, :n] = input_ids[row, s - n:]
        return ids, new

    def _run(self, ids: np.ndarray, new: np.ndarray, index: np.ndarray, last: bool) -> np.ndarray:
        total = self.lengths + new
        grown = grown_capacity(total, self.capacity, self.context)
        if grown:
            self._allocate(len(self.lengths), grown)
        out = self.logits if last else np.empty((index.shape[0], self.vocab), self.dtype)
        run_step(self.sess, self.io, ids, total, index, out)
        self.lengths = total
        self.past_len += ids.shape[1]
        return out

    def step_last(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                  position_ids: np.ndarray) -> np.ndarray:
        """Logits of each row's last new token [B, V] (the graph computes only those), in a
        buffer the session reuses: valid until the next step."""
        ids, new = self._compact(input_ids, attention_mask)
        s = ids.shape[1]
        return self._run(ids, new, np.arange(len(new), dtype=np.int64) * s + new - 1, last=True)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        """Session.step: logits [B, S, V] in the caller's (left-padded) layout."""
        ids, new = self._compact(input_ids, attention_mask)
        b, s = ids.shape
        col = np.arange(s)[None] - (s - new)[:, None]  # left-padded column -> right-padded slot
        index = (np.arange(b)[:, None] * s + np.clip(col, 0, None)).reshape(-1).astype(np.int64)
        return self._run(ids, new, index, last=False).reshape(b, s, self.vocab)

    def close(self) -> None:
        self.sess = None
        self.shared = {}


def grown_capacity(total: np.ndarray, capacity: int, context: int) -> int | None:
    """The cache capacity rows of ``total`` tokens need (doubling, at most the context), or None when
    ``capacity`` holds them; RuntimeFailure past the context."""
    longest = int(total.max())
    if longest <= capacity:
        return None
    if longest > context:
        raise RuntimeFailure("the sequence outgrew the model's context", given=longest,
                             expected=f"<= {context} tokens")
    return min(max(2 * capacity, longest), context)


def run_step(sess: Any, io: Any, ids: np.ndarray, total: np.ndarray, index: np.ndarray, out: np.ndarray) -> None:
    """One run of the fast graph through ``io`` (its caches already bound): ``ids`` [B, S] right-padded,
    ``total`` [B] tokens per row after the step, ``index`` the flat rows of logits wanted, into ``out``."""
    io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
    io.bind_cpu_input("seqlens_k", (total - 1).astype(np.int32))
    io.bind_cpu_input("total_sequence_length", np.array(total.max(), dtype=np.int32))
    io.bind_cpu_input("logits_index", np.ascontiguousarray(index, dtype=np.int64))
    io.bind_output("logits", "cpu", 0, out.dtype.type, list(out.shape), out.ctypes.data)
    try:
        sess.run_with_iobinding(io)
    except Exception as exc:  # ORT raises RuntimeError / its own types
        raise run_failure(exc) from None
