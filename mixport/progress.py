"""Progress on stderr: one tqdm bar over the named steps of a long job."""

from __future__ import annotations

import sys
from types import TracebackType


class StepBar:
    """``bar("tracing to ONNX")`` closes the previous step and starts the next, ``bar.detail(...)``
    says how far the current one is; use as a context."""

    def __init__(self, total: int, desc: str = "mixport") -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, file=sys.stderr, unit="step", leave=True,
                        bar_format="{desc} {n_fmt}/{total_fmt} [{elapsed}{postfix}]", dynamic_ncols=True)
        self.started = False
        self.desc = desc

    def __call__(self, message: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_postfix_str("", refresh=False)
        self.bar.set_description_str(f"{self.desc}: {message}")

    def detail(self, text: str) -> None:
        """Where the current step is (e.g. "weights 120/995"), shown after the elapsed time."""
        self.bar.set_postfix_str(text)

    def __enter__(self) -> StepBar:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None and self.started:
            self.bar.set_postfix_str("", refresh=False)
            self.bar.update(1)
            self.bar.set_description_str(f"{self.desc}: done")
        self.bar.close()
