"""One tiny export per test session (unfused, as `mixport export --no-fuse` writes it)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from mixport.exporter.export import export
from mixport.exporter.tiny import write_tiny


@pytest.fixture(scope="session")
def rt_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny Mixtral as a Hugging Face folder (seed 0)."""
    return write_tiny(tmp_path_factory.mktemp("rt-src"), seed=0)


@pytest.fixture(scope="session")
def rt_export(rt_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    for name in ("torch.onnx", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    out = tmp_path_factory.mktemp("rt-out") / "tiny"
    export(rt_source, out, fuse=False)
    return out


@pytest.fixture()
def rt_copy(rt_export: Path, tmp_path: Path) -> Path:
    """A private copy of the export folder, for tests that damage it."""
    return Path(shutil.copytree(rt_export, tmp_path / "copy"))


@pytest.fixture(scope="session")
def pipes(rt_export: Path) -> dict:
    """Both ONNX Runtime graphs of the tiny export, loaded once."""
    from mixport.runtime import load

    return {g: load(rt_export, threads=1, graph=g) for g in ("fast", "portable")}
