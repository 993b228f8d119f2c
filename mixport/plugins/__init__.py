"""TensorRT plugins for the mixport ``TopKRouting`` and ``MoE`` nodes (see README.md).

Importing this package is cheap; TensorRT is imported by ``register_plugins``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["import_trt", "register_plugins", "trt_flavor"]


def __getattr__(name: str) -> Any:
    if name in ("register_plugins", "trt_flavor"):
        from mixport.plugins import registry

        return getattr(registry, name)
    if name == "import_trt":
        from mixport.plugins.trt_import import import_trt

        return import_trt
    raise AttributeError(name)
