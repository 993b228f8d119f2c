"""Which backend runs an export folder: TensorRT when it can, ONNX Runtime otherwise, and why.

TensorRT is used only when the folder's engine is up to date (``engine_status``)
AND a GPU is visible; a stale engine is never run silently: ``auto`` falls back
to ONNX Runtime and says why, ``tensorrt`` refuses with the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mixport.artifact import Manifest
from mixport.errors import RuntimeFailure, TensorRTNotFoundError

BACKENDS = ("auto", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # "onnxruntime" | "tensorrt"
    reason: str


def tensorrt_unavailable(folder: Path, manifest: Manifest) -> str | None:
    """Why FOLDER cannot run with TensorRT here, or None when it can (cheap checks first)."""
    from mixport.engine.status import engine_status, visible_gpu
    from mixport.plugins.trt_import import INSTALL_HINT, import_trt

    if manifest.engine is None:
        return f"the folder has no engine (build one: mixport build {folder})"
    try:
        trt = import_trt()
    except TensorRTNotFoundError:
        return f"TensorRT is not installed ({INSTALL_HINT})"
    gpu = visible_gpu()
    ok, reason = engine_status(folder, trt, gpu=gpu, manifest=manifest)
    if not ok:
        return f"model.engine is stale: {reason} (rebuild: mixport build {folder} --force)"
    if gpu is None:
        return "model.engine is up to date but no CUDA GPU is visible"
    return None


def choose_backend(folder: Path, manifest: Manifest, backend: str = "auto") -> BackendChoice:
    """The backend to use for ``backend`` ("auto" | "onnxruntime" | "tensorrt"), with the reason."""
    if backend not in BACKENDS:
        raise RuntimeFailure("unknown backend", given=backend, expected=" | ".join(BACKENDS))
    if backend == "onnxruntime":
        return BackendChoice("onnxruntime", "asked for with --backend onnxruntime")
    why_not = tensorrt_unavailable(Path(folder), manifest)
    if why_not is None:
        return BackendChoice("tensorrt", "model.engine is up to date for this GPU")
    if backend == "tensorrt":
        raise RuntimeFailure(f"cannot run with TensorRT: {why_not}", given=str(folder),
                             expected="an up-to-date model.engine and a CUDA GPU",
                             hint="use --backend auto to fall back to ONNX Runtime")
    return BackendChoice("onnxruntime", f"TensorRT not used: {why_not}")
