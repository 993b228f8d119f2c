"""Engine builder library: mixport ONNX -> TensorRT / TensorRT-RTX engine (see builder.py).

Importing this package is cheap; TensorRT is imported by ``build_engine``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BuildRequest", "BuildResult", "LayerInfo", "ProfileSpec", "build_engine", "build_folder",
           "engine_status", "ensure_parser_symlink"]

_WHERE = {"BuildResult": "builder", "build_engine": "builder", "LayerInfo": "network",
          "ProfileSpec": "profiles", "ensure_parser_symlink": "symlink", "BuildRequest": "folder",
          "build_folder": "folder", "engine_status": "status"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"mixport.engine.{_WHERE[name]}"), name)
