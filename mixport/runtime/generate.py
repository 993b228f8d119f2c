"""The KV-cache generation loop over any Session: left-padded batches, per-row stop."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from mixport.errors import RuntimeFailure
from mixport.runtime.sampling import Sampler, SamplingConfig, short
from mixport.runtime.session import Session

# B batch, L prompt length (padded), V vocab


@dataclass
class GenerationRequest:
    prompts: list[list[int]]
    max_new_tokens: int = 32
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    # stop(row, new_ids) -> True when the row is done (stop strings live in the caller's decoder)
    stop: Callable[[int, list[int]], bool] | None = None
    on_token: Callable[[int, int], None] | None = None  # (row, token id), as produced
    vocab_size: int | None = None  # prompt ids must lie in [0, vocab_size) (None: not checked)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> input_ids [B, L], attention_mask [B, L], position_ids [B, L] (0 on padding)."""
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), length), dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, length - len(p):] = p
        mask[row, length - len(p):] = 1
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return ids, mask, pos


def check_ids(prompts: object, vocab_size: int | None) -> None:
    """Prompts are lists of integer token ids, each in [0, vocab_size): never wrapped or clipped."""
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in prompts):
        raise RuntimeFailure("prompts must be a list of token-id lists", given=repr(prompts)[:60],
                             expected="[[1, 2, 3], ...]")
    ids = [t for p in prompts for t in p]
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, (int, np.integer))]
    if bad:
        raise RuntimeFailure("token ids must be integers", given=repr(bad[0])[:40], expected="int token ids")
    outside = [int(t) for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if outside:
        raise RuntimeFailure("token id outside the vocabulary", given=", ".join(map(str, outside[:5])),
                             expected=f"0 <= id < {vocab_size} (vocab_size)" if vocab_size else "0 <= id",
                             hint="token ids come from the model's tokenizer")


def check_request(req: GenerationRequest, context: int) -> None:
    check_ids(req.prompts, req.vocab_size)
    if not req.prompts or any(len(p) == 0 for p in req.prompts):
        raise RuntimeFailure("empty prompt", given=req.prompts[:1], expected="at least one token per prompt")
    longest = max(len(p) for p in req.prompts)
    if longest >= context:
        raise RuntimeFailure("prompt is longer than the model's context", given=f"{longest} tokens",
                             expected=f"fewer than {context} (max_position_embeddings)",
                             hint="shorten the prompt")
    n = req.max_new_tokens
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise RuntimeFailure("max_new_tokens must be a positive integer", given=short(n), expected=">= 1")


def check_stops(stop: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Stop strings as a list (one string is one stop string); an empty or non-string one is refused:
    an empty stop string would match everywhere and end every row at once."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    for s in stops:
        if not isinstance(s, str) or not s:
            raise RuntimeFailure("invalid stop string", given=short(s), expected="a non-empty string")
    return stops


def last_logits(session: Session, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """[B, V] logits of each row's last token (``step_last`` when the backend has it)."""
    if hasattr(session, "step_last"):
        return session.step_last(ids, mask, pos)
    return session.step(ids, mask, pos)[:, -1]


def iter_generate(session: Session, req: GenerationRequest, context: int) -> Iterator[tuple[int, int]]:
    """Prefill in one step, then one token per step; yields (row, token) as produced."""
    check_request(req, context)
    sampler = Sampler(req.sampling)
    ids, mask, pos = left_pad(req.prompts, req.pad_id)
    batch = len(req.prompts)
    session.reset(batch)
    seen = [list(p) for p in req.prompts]
    new: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    steps = min(req.max_new_tokens, context - ids.shape[1])
    if hasattr(session, "reserve"):
        session.reserve(ids.shape[1] + steps)
    logits = last_logits(session, ids, mask, pos)  # [B, V]
    for step in range(steps):
        nxt = sampler(logits, seen)
        for row in np.flatnonzero(~done):
            token = int(nxt[row])
            new[row].append(token)
            seen[row].append(token)
            yield int(row), token
            if token in req.eos_ids or (req.stop and req.stop(int(row), new[row])):
                done[row] = True
        if done.all() or step == steps - 1:
            return
        nxt = np.where(done, req.pad_id, nxt)
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        logits = last_logits(session, nxt[:, None].astype(np.int64), mask, pos)


def generate(session: Session, req: GenerationRequest, context: int) -> list[list[int]]:
    """The new tokens of each row (EOS included when it stopped the row)."""
    new: list[list[int]] = [[] for _ in req.prompts]
    for row, token in iter_generate(session, req, context):
        new[row].append(token)
        if req.on_token:
            req.on_token(row, token)
    return new
