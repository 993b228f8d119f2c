"""Is an export folder's ``model.engine`` still the engine of its ``model.onnx`` for this machine?

The manifest's ``engine`` section (written by ``mixport build``) records what the
engine was built from and for; ``engine_status`` compares it with what is here:
the engine file itself, the ONNX file, the TensorRT flavor and version, and the
GPU when one is visible. No GPU is needed to answer (nothing is deserialized).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from mixport import artifact
from mixport.plugins.trt_import import describe, flavor_of

ENGINE_FILE = "model.engine"
DETECT = "detect"  # engine_status(gpu=DETECT): look for a GPU through torch


def visible_gpu() -> str | None:
    """The compute capability of CUDA device 0 as "sm90", or None when no GPU is visible."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"sm{major}{minor}"


def gpu_mismatch(record: dict[str, Any], gpu: str) -> str | None:
    """Why an engine built for ``record["targets"]`` cannot run on ``gpu``; None if it can."""
    targets = list(record.get("targets", []))
    built_on = record.get("gpu_at_build")
    if "current" in targets:
        if gpu == built_on:
            return None
        return f"it was built for the build machine's GPU ({built_on or 'unknown'}), this GPU is {gpu}"
    if "ampere+" in targets:
        return None if int(gpu[2:]) >= 80 else f"it targets Ampere or newer (sm80+), this GPU is {gpu}"
    if gpu in targets:
        return None
    return f"this GPU ({gpu}) is not among its targets ({', '.join(targets) or 'none recorded'})"


def _file_problem(folder: Path, record: dict[str, Any]) -> str | None:
    path = folder / record.get("file", ENGINE_FILE)
    if not path.is_file():
        return f"{path.name} is missing"
    if path.stat().st_size != record.get("bytes", -1) or artifact.file_sha256(path) != record.get("sha256"):
        return f"{path.name} changed after it was built (its sha256 differs from the manifest's)"
    onnx_path = folder / artifact.MODEL_FILE
    if not onnx_path.is_file():
        return f"{artifact.MODEL_FILE} is missing"
    onnx_sha = artifact.file_sha256(onnx_path)
    if onnx_sha != record.get("onnx_sha256"):
        return (f"{artifact.MODEL_FILE} changed since the engine was built "
                f"(sha256 {onnx_sha[:12]}..., the engine was built from "
                f"{str(record.get('onnx_sha256'))[:12]}...)")
    return None


def _trt_problem(record: dict[str, Any], trt: ModuleType) -> str | None:
    flavor, version = flavor_of(trt), str(getattr(trt, "__version__", "?"))
    if (record.get("trt_flavor"), record.get("trt_version")) != (flavor, version):
        return (f"it was built with {record.get('trt', 'another TensorRT')}, this is {describe(trt)} "
                "(engines run only with the TensorRT flavor and version that built them)")
    return None


def engine_status(folder: str | Path, trt: ModuleType, *, gpu: str | None = DETECT,
                  manifest: dict[str, Any] | None = None) -> tuple[bool, str]:
    """(True, what it is) when FOLDER's engine is up to date here, else (False, why not).

    gpu: "sm90"-style compute capability, None for "no GPU", DETECT to ask torch.
    """
    folder = Path(folder)
    manifest = manifest if manifest is not None else artifact.read_manifest(folder)
    record = manifest.get("engine")
    if not record:
        return False, f"no engine was built in {folder} (run: mixport build {folder})"
    problem = _file_problem(folder, record) or _trt_problem(record, trt)
    gpu = visible_gpu() if gpu == DETECT else gpu
    if problem is None and gpu is not None:
        problem = gpu_mismatch(record, gpu)
    if problem is not None:
        return False, problem
    where = f", runs on this {gpu}" if gpu else ""
    return True, (f"built with {record.get('trt')} for {', '.join(record.get('targets', []))} "
                  f"from model.onnx {str(record.get('onnx_sha256'))[:12]}...{where}")
