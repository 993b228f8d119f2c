"""A TensorRT ILogger that keeps error text (for BuildError) and forwards the rest to logging.

TensorRT's messages go to the ``mixport.engine`` logger, its ONNX parser's too ("Make sure input
input_ids has Int64 binding." is a WARNING through this ILogger; the parser writes nothing to
file descriptors 1 or 2 itself, tests/engine/test_build_logs.py checks). That logger holds a
NullHandler, else Python's last-resort handler would print the warnings on stderr: they reach
the user only where a handler is configured (the CLI's ``-v``). Errors reach the user inside
mixport's own one-line BuildError.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Any

log = logging.getLogger("mixport.engine")
log.addHandler(logging.NullHandler())


@functools.cache
def _logger_class(trt: ModuleType) -> type:
    class CollectingLogger(trt.ILogger):  # type: ignore[name-defined, misc]
        """Errors kept in ``errors``; warnings and info go to the ``mixport.engine`` logger."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = int(severity)  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
            if level <= 1:
                self.errors.append(msg)
                log.error("%s", msg)
            elif level == 2:
                log.warning("%s", msg)
            elif level == 3:
                log.debug("%s", msg)

    return CollectingLogger


def make_logger(trt: ModuleType) -> Any:
    """A fresh collecting logger for ``trt``'s Builder / OnnxParser."""
    return _logger_class(trt)()
