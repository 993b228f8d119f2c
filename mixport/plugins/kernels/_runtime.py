"""Shared plumbing for the kernels: lazy imports, errors, and launch mode.

A kernel is written once as a plain Python function and wrapped on use, the
way ``triton.jit`` would: as a ``JITFunction`` (CUDA tensors, ahead-of-time
compiles) or, while ``TRITON_INTERPRET=1``, as an ``InterpretedFunction`` that
runs on CPU tensors. Triton reads the variable each time it is asked
(``triton.knobs.runtime.interpret``; ``triton.jit`` asks at decoration time),
so the wrapper is chosen per launch mode, not fixed by the first launch.
triton 3.9 restores ``triton.language`` after each interpreted launch, but
older releases (``mixport[kernels]`` allows triton >= 3.4) patched it for the
rest of the process, so a process should still run one mode only: the tests
run the interpreted kernels in a child process, and ``compile.py`` starts a
clean subprocess when it finds interpreter mode.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from mixport.errors import KernelDependencyError


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise a KernelDependencyError naming the package."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        raise KernelDependencyError(
            f"the mixport kernels need '{package}' for {purpose}, and it cannot be imported",
            given=repr(exc), expected=f"an importable '{package}'",
            hint=f"pip install {package}") from exc


def interpret_mode() -> bool:
    """True when triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    knobs = require("triton.knobs", "kernel launches")
    return bool(knobs.runtime.interpret)


class Kernel:
    """A Triton kernel body, wrapped lazily for the process's launch mode."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self.name = fn.__name__
        self._wrapped: dict[bool, Any] = {}  # interpret_mode() -> wrapper

    @property
    def jit(self) -> Any:
        """The ``triton.JITFunction`` (compiled mode only): launches and ``triton.compile``."""
        if interpret_mode():
            raise KernelDependencyError(
                f"kernel {self.name} cannot be compiled in Triton interpreter mode",
                given="TRITON_INTERPRET=1", expected="TRITON_INTERPRET unset",
                hint="compile in a process without TRITON_INTERPRET (compile_all does this)")
        runtime = require("triton.runtime.jit", "GPU kernels")
        return runtime.JITFunction(self.fn)

    @property
    def wrapped(self) -> Any:
        """``JITFunction`` or ``InterpretedFunction``, matching ``interpret_mode()`` now."""
        mode = interpret_mode()
        if mode not in self._wrapped:
            if mode:
                interpreter = require("triton.runtime.interpreter", "CPU interpretation")
                self._wrapped[mode] = interpreter.InterpretedFunction(self.fn)
            else:
                self._wrapped[mode] = self.jit
        return self._wrapped[mode]

    def launch(self, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
        """Launch on ``grid`` with positional args and constexpr / launch keywords."""
        self.wrapped[grid](*args, **kwargs)


def kernel(fn: Callable[..., None]) -> Kernel:
    """Decorator: mark ``fn`` as a Triton kernel body (see :class:`Kernel`)."""
    return Kernel(fn)


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)
