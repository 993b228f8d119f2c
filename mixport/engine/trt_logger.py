"""A TensorRT ILogger that keeps error text (for BuildError) and forwards the rest to logging.

TensorRT's messages (its ONNX parser's too: "Make sure input input_ids has Int64 binding." is a
WARNING through this logger, nothing is printed on the process's stdout or stderr) go to the
``mixport.engine`` logger, which holds a NullHandler: Python's last-resort handler would print
its warnings on stderr. They reach the user only when a handler is configured (``-v``);
errors reach the user inside mixport's own one-line BuildError.
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
