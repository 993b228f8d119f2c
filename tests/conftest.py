"""Shared fixtures: tiny Mixtral folders built in code from a seed, exported once per session.

CI rule: under ``CI=true`` a skip is a failure, except for tests marked ``gpu``
(the CI machines have no GPU). A missing test dependency (transformers,
TensorRT, triton, nvcc...) must not turn the suite green by skipping what it
guards; locally such tests still skip, with the reason.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Generator
from dataclasses import replace
from pathlib import Path

import pytest

from mixport.exporter.tiny import TINY, write_tiny
from mixport.models import MoEConfig
from tests.helpers import has_gpu, in_ci, missing_dependency

CI_SKIP = "skipped under CI=true, where only `gpu` tests may skip: "


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Generator[None, None, None]:
    """Under CI=true a skipped test fails, unless it is marked ``gpu`` (xfail is left alone)."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if (report.skipped and in_ci() and item.get_closest_marker("gpu") is None
            and not hasattr(report, "wasxfail")):
        report.outcome = "failed"
        report.longrepr = CI_SKIP + _skip_reason(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, None, None]:
    """Under CI=true a module skipped at import (``importorskip`` at module level) is an error."""
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if report.skipped and in_ci():
        report.outcome = "failed"
        report.longrepr = CI_SKIP + _skip_reason(report)


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


QUANT_SCHEMES = {"int8": (8, 32, True), "int4": (4, 64, True), "int4-zp": (4, 32, False)}  # bits, block, symmetric


@pytest.fixture(scope="session")
def quantized_export(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``quantized_export(name)``: tiny_dir exported with ``--quantize`` (QUANT_SCHEMES[name]; int4's
    block of 64 leaves a partial block on the intermediate size 96), made once per session, read-only."""
    from mixport import quant
    from mixport.exporter.export import export
    from mixport.passes import QuantOptions

    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            bits, block, symmetric = QUANT_SCHEMES[name]
            out = tmp_path_factory.mktemp(f"tiny-{name}") / "out"
            export(tiny_dir, out, quantize=QuantOptions(quant.Scheme(bits, block, symmetric)))
            made[name] = out
        return made[name]

    return get


@pytest.fixture
def export_copy(tiny_export: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the tiny export."""
    dst = tmp_path / "export"
    shutil.copytree(tiny_export, dst)
    return dst


@pytest.fixture(scope="session")
def trt_module():  # noqa: ANN201 - the tensorrt / tensorrt_rtx_bindings module
    """The TensorRT module mixport would use; skips (fails under CI) when neither flavor imports."""
    from mixport.errors import TensorRTNotFoundError
    from mixport.plugins.trt_import import import_trt

    try:
        return import_trt()
    except TensorRTNotFoundError as exc:
        missing_dependency(f"TensorRT not importable (pip install 'mixport[trt]'): {exc}")


@pytest.fixture
def rtx_module(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - the tensorrt_rtx_bindings module
    """TensorRT-RTX (the test extra installs it), used by mixport even where full TensorRT is installed.

    For tests of RTX-only behaviour: they need not skip on a machine that also has full TensorRT.
    """
    from mixport.errors import TensorRTNotFoundError
    from mixport.plugins.trt_import import RTX, import_trt

    try:
        module = import_trt(RTX)
    except TensorRTNotFoundError as exc:
        missing_dependency(f"TensorRT-RTX not importable (pip install 'mixport[trt]'): {exc}")
    monkeypatch.setenv("MIXPORT_TRT", RTX)
    return module


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
