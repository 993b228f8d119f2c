"""The one interface every backend implements: a KV-cached decoder step.

A Session owns its KV cache. ``reset(batch)`` empties it; ``step`` feeds new tokens
[B, S] (with the full attention mask [B, P+S] and positions [B, S]) and returns the
logits of those tokens [B, S, V], appending their keys/values to the cache.

Optional (the generation loop uses them when present):
``reserve(capacity)`` sizes the cache for ``capacity`` tokens per row before the
prefill; ``step_last(...)`` is ``step(...)[:, -1]`` ([B, V]) for backends that can
skip the other positions' logits.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Session(Protocol):
    backend: str  # "onnxruntime" | "tensorrt"
    past_len: int

    def reset(self, batch: int) -> None: ...

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...
