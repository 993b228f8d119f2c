"""One place that picks the TensorRT flavor: full TensorRT or TensorRT-RTX.

Full ``tensorrt`` wins when it imports; otherwise ``tensorrt_rtx_bindings``
(the PyPI wheels ``tensorrt-rtx-cu13-libs`` + ``tensorrt-rtx-cu13-bindings``).
``MIXPORT_TRT=tensorrt`` or ``MIXPORT_TRT=tensorrt_rtx`` forces one of them.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

from mixport.errors import TensorRTNotFoundError

FULL = "tensorrt"
RTX = "tensorrt_rtx"
_MODULES = {FULL: "tensorrt", RTX: "tensorrt_rtx_bindings"}
INSTALL_HINT = (
    "pip install 'mixport[trt]' (= tensorrt-rtx-cu13-libs + tensorrt-rtx-cu13-bindings: "
    "TensorRT-RTX, builds on CPU-only machines), or pip install tensorrt"
)


def _try_import(module_name: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(module_name), ""
    except (ImportError, OSError) as exc:  # OSError: a library failed to load
        return None, f"{module_name}: {exc}"


def import_trt(flavor: str | None = None) -> ModuleType:
    """Return the TensorRT Python module to use (``flavor``: "tensorrt" or "tensorrt_rtx").

    ``MIXPORT_TRT`` is read on every call (the import itself is cached per flavor).
    """
    return _import_trt(flavor or os.environ.get("MIXPORT_TRT") or None)


@functools.cache
def _import_trt(flavor: str | None) -> ModuleType:
    if flavor is not None and flavor not in _MODULES:
        raise TensorRTNotFoundError(
            "unknown TensorRT flavor", given=flavor, expected=" or ".join(_MODULES),
            hint="unset MIXPORT_TRT to pick automatically")
    order = [flavor] if flavor else [FULL, RTX]
    failures = []
    for name in order:
        module, why = _try_import(_MODULES[name])
        if module is not None:
            return module
        failures.append(why)
    raise TensorRTNotFoundError(
        "TensorRT is not installed", given="; ".join(failures),
        expected="an importable tensorrt or tensorrt_rtx_bindings", hint=INSTALL_HINT)


def flavor_of(trt: ModuleType) -> str:
    """"tensorrt_rtx" for the TensorRT-RTX bindings, "tensorrt" for full TensorRT."""
    return RTX if trt.__name__.split(".")[0] == _MODULES[RTX] else FULL


def describe(trt: ModuleType) -> str:
    """A one-line description, e.g. "TensorRT-RTX 1.7.1.116 (tensorrt_rtx_bindings)"."""
    label = "TensorRT-RTX" if flavor_of(trt) == RTX else "TensorRT"
    return f"{label} {getattr(trt, '__version__', '?')} ({trt.__name__})"
