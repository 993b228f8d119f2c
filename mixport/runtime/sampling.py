"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling, with a
repetition penalty (CTRL-style, as in transformers). numpy only, seeded Generator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mixport.errors import RuntimeFailure


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise RuntimeFailure("invalid sampling settings", given=self, expected="temperature >= 0, "
                                 "0 < top_p <= 1, top_k >= 0, repetition_penalty > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def penalize(logits: np.ndarray, seen: list[list[int]], penalty: float) -> np.ndarray:
    """logits [B, V]: divide positive / multiply negative logits of already-seen tokens."""
    if penalty == 1.0:
        return logits
    logits = logits.copy()
    for row, ids in enumerate(seen):
        idx = np.unique(np.asarray(ids, dtype=np.int64))
        vals = logits[row, idx]
        logits[row, idx] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def _filter(probs: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """probs [V] -> renormalized probs with the top-k / nucleus cut applied."""
    order = np.argsort(-probs, kind="stable")
    keep = np.ones_like(probs, dtype=bool)
    if top_k:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        cum = np.cumsum(probs[order])
        cut = np.searchsorted(cum, top_p) + 1  # smallest prefix with mass >= top_p
        keep[order[cut:]] = False
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum()


class Sampler:
    def __init__(self, cfg: SamplingConfig) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray, seen: list[list[int]]) -> np.ndarray:
        """logits [B, V] of the last position -> next ids [B]."""
        logits = penalize(logits.astype(np.float32), seen, self.cfg.repetition_penalty)
        if self.cfg.greedy:
            return logits.argmax(-1)
        z = logits.astype(np.float64) / self.cfg.temperature
        probs = np.exp(z - z.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        rows = [_filter(p, self.cfg.top_k, self.cfg.top_p) for p in probs]
        return np.array([self.rng.choice(len(p), p=p) for p in rows], dtype=np.int64)
