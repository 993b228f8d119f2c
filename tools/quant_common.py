"""Helpers the quantization benchmark's variants share: the prompts, logit errors, sizes, a child
process's peak RSS, and the interleaved timing rounds."""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# () -> (prefill seconds, decode seconds for new_tokens - 1 greedy steps)
Timer = Callable[[], tuple[float, float]]


@dataclass(frozen=True)
class Plan:
    """What every variant runs: the same prompt and token counts, the same teacher-forced tokens."""

    vocab: int
    prompt_len: int = 64
    new_tokens: int = 128
    error_len: int = 128
    threads: int = 2

    @property
    def prompt(self) -> list[int]:
        """The benchmark prompt (as `mixport bench` draws it: seed 0, ids 3..vocab-1)."""
        return np.random.default_rng(0).integers(3, self.vocab, self.prompt_len).tolist()

    @property
    def error_tokens(self) -> list[int]:
        """The teacher-forced sequence every variant's logits are compared on (seed 1)."""
        return np.random.default_rng(1).integers(3, self.vocab, self.error_len).tolist()


def warm_up(plan: Plan) -> Plan:
    """The same plan with a short generation: the warm-up run every variant gets before timing."""
    return dataclasses.replace(plan, new_tokens=min(plan.new_tokens, 4))


@dataclass
class Prepared:
    """A variant ready to time: its timer (None: measured but not timed) and its logits over
    ``Plan.error_tokens`` ([L, V])."""

    timer: Timer | None
    logits: np.ndarray
    close: Callable[[], None] = field(default=lambda: None)


def logit_errors(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """``got`` vs ``ref``, both [L, V]: max |err|, the median over positions of each position's max
    |err| (the max is one position's tail: a routing decision that flipped shows there), RMS err,
    top-1 agreement."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64).reshape(ref.shape)
    diff = np.abs(got - ref)
    return {"max_err": float(diff.max()), "p50_err": float(np.median(diff.max(-1))),
            "rms_err": float(np.sqrt(np.mean(diff * diff))), "top1": float(np.mean(got.argmax(-1) == ref.argmax(-1)))}


def size_mb(path: Path) -> float:
    """Bytes of a file, or of every file under a folder, in MB (1e6)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size / 1e6
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def run_child(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` with stdout+stderr to ``log`` and ENV added; its exit code. (Its peak RSS cannot be
    read from here: wait4's ru_maxrss starts from this process's RSS; quant_mixport.run_cli has the
    child report its own VmHWM.)"""
    with open(log, "wb") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env={**os.environ, **(env or {})}).returncode


def tail(log: Path, lines: int = 3) -> str:
    """The last lines of a child's log, on one line (for a 'why' message)."""
    try:
        text = Path(log).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(ln.strip() for ln in text[-lines:])


def interleaved(timers: dict[str, Timer], rounds: int) -> dict[str, dict[str, float]]:
    """Rounds of one timed generation per variant, so that other jobs' load hits all alike:
    per variant the median prefill and decode seconds."""
    got: dict[str, list[tuple[float, float]]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            got[name].append(timer())
    return {name: {"prefill_s": statistics.median(t[0] for t in ts),
                   "decode_s": statistics.median(t[1] for t in ts)} for name, ts in got.items()}


def speeds(times: dict[str, float], plan: Plan) -> dict[str, Any]:
    """prefill / decode tok/s from median seconds (decode: new_tokens - 1 steps after the prefill)."""
    return {"prefill_tok_s": plan.prompt_len / times["prefill_s"],
            "decode_tok_s": (plan.new_tokens - 1) / times["decode_s"]}
