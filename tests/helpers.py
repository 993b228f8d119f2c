"""Helpers shared by the test modules: the CLI in-process, the one-line error contract, CI rules."""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import onnx
import pytest
from click.testing import CliRunner, Result

from mixport import artifact
from mixport.cli import main


def in_ci() -> bool:
    """True under CI (``CI=true``, as CI services set it): a missing test dependency fails there."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing_dependency(reason: str) -> NoReturn:
    """Skip the test for ``reason`` (a missing test dependency) locally; fail it under CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing test dependency fails, only `gpu` tests may skip)",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=True)  # also at a module's top level (its import skips)


def require_module(name: str, install: str | None = None) -> ModuleType:
    """``import name``, or :func:`missing_dependency` naming the package to install."""
    try:
        return importlib.import_module(name)
    except (ImportError, OSError) as exc:  # OSError: a native library failed to load
        why = str(exc)
    missing_dependency(f"{name} is not importable (pip install {install or name}): {why}")


def has_gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def invoke(*args: object) -> Result:
    """`mixport ARGS...` through click's CliRunner (stdout and stderr both in ``.output``)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result: Result, *fragments: str) -> str:
    """Exit 1, exactly one `error:` line holding every fragment, no traceback; returns the line."""
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def reexport_changed(folder: Path) -> None:
    """What a re-export does to a folder: a different model.onnx, the manifest's hash updated."""
    model = onnx.load(str(folder / "model.onnx"))
    onnx.helper.set_model_props(model, {"re-exported": "yes"})
    onnx.save(model, str(folder / "model.onnx"))
    manifest = artifact.Manifest.read(folder)
    dataclasses.replace(manifest, onnx_sha256=artifact.file_sha256(folder / "model.onnx")).write(folder)


def count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files hashed from now on (artifact.file_sha256 is the one hash function)."""
    hashed: list[str] = []
    real = artifact.file_sha256

    def counting(path: Path) -> str:
        hashed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(artifact, "file_sha256", counting)
    return hashed


def set_config(folder: Path, **changes: object) -> None:
    """Change config fields of an export as a re-export with those values would record them: in the
    manifest and in model.onnx's recorded config (the graph's nodes unchanged), the hash updated."""
    from mixport import folder_check

    manifest = artifact.Manifest.read(folder)
    config = {**manifest.config, **changes}
    model = onnx.load(str(folder / "model.onnx"))
    folder_check.record_config(model, config)
    onnx.save(model, str(folder / "model.onnx"))
    dataclasses.replace(manifest, config=config, onnx_sha256=artifact.file_sha256(folder / "model.onnx")).write(folder)
