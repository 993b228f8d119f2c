"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling, with a
repetition penalty (CTRL-style, as in transformers). numpy only, seeded Generator."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mixport.errors import RuntimeFailure


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_k, top_p and seed only apply when sampling (temperature > 0),
    so setting them with temperature 0 is refused rather than silently ignored."""

    temperature: float = 0.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_real("temperature", self.temperature, lambda v: v >= 0, ">= 0 (0: greedy)")
        _check_real("top_p", self.top_p, lambda v: 0 < v <= 1, "0 < top_p <= 1")
        _check_real("repetition_penalty", self.repetition_penalty, lambda v: v > 0, "> 0 (1: off)")
        _check_int("top_k", self.top_k, 0, None, ">= 0 (0: off)")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED, "0 <= seed <= 2**64 - 1")
        if self.greedy:
            unused = [f"{name}={value}" for name, value, off in (("top_k", self.top_k, 0), ("top_p", self.top_p, 1.0),
                                                                  ("seed", self.seed, None)) if value != off]
            if unused:
                verb = "applies" if len(unused) == 1 else "apply"
                raise RuntimeFailure(f"{', '.join(unused)} only {verb} when sampling", given="temperature=0 (greedy)",
                                     expected="temperature > 0 (e.g. 1.0) with top_k / top_p / seed",
                                     hint="drop them for greedy decoding")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


MAX_SEED = 2**64 - 1


def _check_real(name: str, value: object, ok: Callable[[float], bool], expected: str) -> None:
    try:
        good = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) and ok(value)
    except OverflowError:  # an int too large for a float
        good = False
    if not good:
        raise RuntimeFailure(f"invalid sampling setting {name}", given=short(value),
                             expected=f"a finite number, {expected}")


def _check_int(name: str, value: object, low: int, high: int | None, expected: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low \
            or (high is not None and value > high):
        raise RuntimeFailure(f"invalid sampling setting {name}", given=short(value), expected=f"an integer, {expected}")


def short(value: object) -> str:
    """The value as the user wrote it, cut to one short line."""
    text = repr(value) if isinstance(value, str) else str(value)
    line = text.splitlines()[0] if text.strip() else repr(text)
    return line if len(line) <= 60 else line[:57] + "..."


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
