"""Progress on stderr: one tqdm bar over the named steps of a long job.

The bar is also where a long job notices a signal that a library swallowed: the CLI's handlers
``latch`` each SIGINT / SIGTERM before raising, and every step and detail call re-raises a latched
signal that did not end the job (native code that turns an interrupt into an ordinary error, caught
by a library's fallback, would otherwise let the job run on and exit 0)."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

_latched: list[BaseException] = []  # the interrupt (KeyboardInterrupt or Terminated) not yet seen through


def latch(exc: BaseException) -> None:
    """Remember an interrupt raised from a signal handler (the CLI's), until it ends the job."""
    _latched[:] = [exc]


def clear_latch() -> None:
    """The interrupt reached the top: nothing to re-raise."""
    _latched.clear()


def reraise_latched() -> None:
    """Raise a latched interrupt again (once) if it has not ended the job yet."""
    if _latched:
        exc = _latched.pop()
        raise type(exc)()


class StepBar:
    """``bar("tracing to ONNX")`` closes the previous step and starts the next, ``bar.detail(...)``
    says how far the current one is, ``bar.note(line)`` prints a line above it; use as a context.
    Nothing is drawn before the first step: a job refused up front shows no bar."""

    def __init__(self, total: int, desc: str = "mixport") -> None:
        self.total = total
        self.desc = desc
        self.bar: Any = None  # tqdm, from the first step on

    def __call__(self, message: str) -> None:
        reraise_latched()
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, file=sys.stderr, unit="step", leave=True,
                            bar_format="{desc} {n_fmt}/{total_fmt} [{elapsed}{postfix}]", dynamic_ncols=True)
        else:
            self.bar.update(1)
        self.bar.set_postfix_str("", refresh=False)
        self.bar.set_description_str(f"{self.desc}: {message}")

    def detail(self, text: str) -> None:
        """Where the current step is (e.g. "weights 120/995"), shown after the elapsed time."""
        reraise_latched()
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def note(self, line: str) -> None:
        """A ``[mixport]`` line on stderr that the bar does not overwrite."""
        if self.bar is None:
            print(f"[mixport] {line}", file=sys.stderr, flush=True)
        else:
            self.bar.write(f"[mixport] {line}", file=sys.stderr)

    def __enter__(self) -> StepBar:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.bar is None:
            return
        if exc_type is None:
            self.bar.set_postfix_str("", refresh=False)
            self.bar.update(1)
            self.bar.set_description_str(f"{self.desc}: done")
        self.bar.close()
