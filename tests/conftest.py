"""Shared fixtures: tiny Mixtral folders built in code from a seed, exported once per session."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from mixport.exporter.tiny import TINY, write_tiny
from mixport.models import MoEConfig
from tests.helpers import has_gpu


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _quiet() -> None:
    for name in ("torch.onnx", "torch.export", "onnxscript", "polygraphy"):
        logging.getLogger(name).setLevel(logging.ERROR)


def tiny_config(**changes: object) -> MoEConfig:
    return replace(TINY, **changes)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny model as a Hugging Face folder."""
    return write_tiny(tmp_path_factory.mktemp("tiny-src"))


@pytest.fixture(scope="session")
def tiny_export(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_dir exported with the default pipeline (read-only for tests: copy before changing)."""
    from mixport.exporter.export import export

    out = tmp_path_factory.mktemp("tiny-export") / "out"
    export(tiny_dir, out)
    return out


@pytest.fixture
def export_copy(tiny_export: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the tiny export."""
    dst = tmp_path / "export"
    shutil.copytree(tiny_export, dst)
    return dst


@pytest.fixture(scope="session")
def trt_module():  # noqa: ANN201 - the tensorrt / tensorrt_rtx_bindings module
    """The TensorRT module mixport would use; skips when neither flavor is importable."""
    from mixport.errors import TensorRTNotFoundError
    from mixport.plugins.trt_import import import_trt

    try:
        return import_trt()
    except TensorRTNotFoundError as exc:
        pytest.skip(f"TensorRT not importable (pip install 'mixport[trt]'): {exc}")


@pytest.fixture(scope="session")
def engine_export(tiny_export: Path, trt_module: object, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_export plus model.engine from `mixport build` defaults (read-only: copy to change)."""
    from mixport.engine.folder import build_folder

    dst = tmp_path_factory.mktemp("tiny-engine") / "out"
    shutil.copytree(tiny_export, dst)
    build_folder(dst)
    return dst


@pytest.fixture
def engine_copy(engine_export: Path, tmp_path: Path) -> Path:
    """A private, writable copy of engine_export."""
    dst = tmp_path / "engine-export"
    shutil.copytree(engine_export, dst)
    return dst
