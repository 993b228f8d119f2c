"""The unversioned ``libtensorrt_rtx.so`` link that TensorRT-RTX's ONNX parser needs.

The PyPI wheel ``tensorrt-rtx-cu13-libs`` ships only ``libtensorrt_rtx.so.1``;
the parser dlopens the unversioned name when it meets a plugin node and aborts
the whole process when that fails. Creating the link once fixes it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from mixport.errors import ParserSymlinkError

LINK_NAME = "libtensorrt_rtx.so"


def rtx_libs_dir() -> Path | None:
    """The folder of the ``tensorrt_rtx_libs`` wheel, or None when it is not installed."""
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _versioned_library(libs: Path) -> Path | None:
    exact = libs / f"{LINK_NAME}.1"
    if exact.is_file():
        return exact
    candidates = sorted(libs.glob(f"{LINK_NAME}.*"))
    return candidates[0] if candidates else None


def ensure_parser_symlink(libs_dir: str | Path | None = None) -> Path | None:
    """Create ``libtensorrt_rtx.so -> libtensorrt_rtx.so.N`` beside the RTX libraries.

    Idempotent. Returns the link path, or None when there is nothing to do (not
    Linux, no ``tensorrt_rtx_libs`` wheel, or no versioned library in it).
    Raises ``ParserSymlinkError`` with the exact ``ln -s`` command when the
    folder is not writable.
    """
    if not sys.platform.startswith("linux"):
        return None
    libs = Path(libs_dir) if libs_dir is not None else rtx_libs_dir()
    target = _versioned_library(libs) if libs is not None else None
    if libs is None or target is None:
        return None
    link = libs / LINK_NAME
    if link.exists():  # follows the link: a dangling one is recreated below
        return link
    try:
        if link.is_symlink():
            link.unlink()
        os.symlink(target.name, link)
    except FileExistsError:
        pass  # another process made it between our check and our call
    except OSError as exc:
        raise ParserSymlinkError(
            "TensorRT-RTX's ONNX parser needs an unversioned library link and it cannot be created",
            given=f"{link}: {exc.strerror or exc}", expected=f"{link} -> {target.name}",
            hint=f"run once: ln -s {target} {link}") from exc
    return link
