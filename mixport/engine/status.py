"""Is an export folder's ``model.engine`` still the engine of its ``model.onnx`` for this machine?

The manifest's ``engine`` section (written by ``mixport build``) records what the
engine was built from and for; ``engine_status`` compares it with what is here:
the engine file itself, the ONNX file, the TensorRT flavor and version, and the
GPU when one is visible. No GPU is needed to answer (nothing is deserialized).
The engine and model.onnx are hashed only when their size or mtime differ from
the ones recorded with their sha256: a multi-GB engine is not reread on every run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType

from mixport import artifact
from mixport.artifact import EngineRecord, Manifest, Stamp
from mixport.plugins.trt_import import describe, flavor_of

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


def gpu_mismatch(record: EngineRecord, gpu: str) -> str | None:
    """Why an engine built for ``record.targets`` cannot run on ``gpu``; None if it can."""
    targets, built_on = list(record.targets), record.gpu_at_build
    if "current" in targets:
        if gpu == built_on:
            return None
        return f"it was built for the build machine's GPU ({built_on or 'unknown'}), this GPU is {gpu}"
    if "ampere+" in targets:
        return None if int(gpu[2:]) >= 80 else f"it targets Ampere or newer (sm80+), this GPU is {gpu}"
    if gpu in targets:
        return None
    return f"this GPU ({gpu}) is not among its targets ({', '.join(targets) or 'none recorded'})"


def _file_problem(folder: Path, record: EngineRecord, manifest: Manifest) -> str | None:
    """Why the engine or the model.onnx it was built from changed; None when neither did.
    Each is hashed only when its size or mtime differs from the stamp the manifest holds."""
    path = artifact.folder_file(folder, record.file)
    if not path.is_file():
        return f"{path.name} is missing"
    now = artifact.verify(path, record.sha256, record.stamp)
    if now is None:
        return f"{path.name} changed after it was built (its sha256 differs from the manifest's)"
    if now != record.stamp:  # same bytes, new mtime (a copy): remember, so the next run does not hash
        artifact.refresh(folder, lambda m: _restamp(m, now))
    onnx_path = folder / artifact.MODEL_FILE
    if not onnx_path.is_file():
        return f"{artifact.MODEL_FILE} is missing"
    built_from = str(record.onnx_sha256)
    if artifact.verify(onnx_path, built_from, manifest.stamps.get(artifact.MODEL_FILE)) is None:
        return (f"{artifact.MODEL_FILE} changed since the engine was built "
                f"(sha256 {artifact.file_sha256(onnx_path)[:12]}..., the engine was built from "
                f"{built_from[:12]}...)")
    return None


def _restamp(manifest: Manifest, now: Stamp) -> Manifest:
    record = manifest.engine
    if record is None or record.sha256 != now.sha256:
        return manifest
    return dataclasses.replace(manifest, engine=dataclasses.replace(record, bytes=now.bytes, mtime_ns=now.mtime_ns))


def _trt_problem(record: EngineRecord, trt: ModuleType) -> str | None:
    flavor, version = flavor_of(trt), str(getattr(trt, "__version__", "?"))
    if (record.trt_flavor, record.trt_version) != (flavor, version):
        return (f"it was built with {record.trt}, this is {describe(trt)} "
                "(engines run only with the TensorRT flavor and version that built them)")
    return None


def engine_status(folder: str | Path, trt: ModuleType, *, gpu: str | None = DETECT,
                  manifest: Manifest | None = None) -> tuple[bool, str]:
    """(True, what it is) when FOLDER's engine is up to date here, else (False, why not).

    gpu: "sm90"-style compute capability, None for "no GPU", DETECT to ask torch.
    """
    folder = Path(folder)
    manifest = manifest if manifest is not None else Manifest.read(folder)
    record = manifest.engine
    if record is None:
        return False, f"no engine was built in {folder} (run: mixport build {folder})"
    problem = _file_problem(folder, record, manifest) or _trt_problem(record, trt)
    gpu = visible_gpu() if gpu == DETECT else gpu
    if problem is None and gpu is not None:
        problem = gpu_mismatch(record, gpu)
    if problem is not None:
        return False, problem
    where = f", runs on this {gpu}" if gpu else ""
    return True, (f"built with {record.trt} for {', '.join(record.targets)} "
                  f"from model.onnx {str(record.onnx_sha256)[:12]}...{where}")
