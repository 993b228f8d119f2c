"""`mixport build` on the tiny export, CPU-only (TensorRT-RTX ahead-of-time build)."""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.util
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import onnx
import pytest

from mixport import artifact
from mixport.artifact import EngineRecord, Manifest
from mixport.engine.status import engine_status, gpu_mismatch
from mixport.plugins.trt_import import RTX, _import_trt, flavor_of
from tests.helpers import count_hashes, invoke, one_line_error, reexport_changed


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _mixport_nodes(folder: Path) -> Counter:
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return Counter(n.op_type for n in model.graph.node if n.domain == "mixport")


def test_build_records_the_engine(engine_export: Path, trt_module: ModuleType) -> None:
    engine = engine_export / "model.engine"
    manifest = Manifest.read(engine_export)
    record = manifest.engine
    assert engine.is_file() and record.bytes == engine.stat().st_size > 0
    assert record.mtime_ns == engine.stat().st_mtime_ns
    assert record.sha256 == artifact.file_sha256(engine)
    assert record.onnx_sha256 == artifact.file_sha256(engine_export / "model.onnx")
    assert (record.trt_flavor, record.trt_version) == (flavor_of(trt_module), trt_module.__version__)
    if flavor_of(trt_module) == RTX:
        assert record.requested_targets == ["ampere+"] and "sm80" in record.targets
    assert record.dtype == "fp32" and record.use_plugins is True
    assert record.ranges["past"][2] < manifest.config["max_position_embeddings"]
    assert oct(engine.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600
    assert not [p for p in engine_export.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_every_mixport_node_became_a_plugin_layer(engine_export: Path) -> None:
    nodes = _mixport_nodes(engine_export)
    assert nodes["TopKRouting"] > 0
    record = Manifest.read(engine_export).engine
    layers = Counter(layer["plugin"] for layer in record.plugin_layers)  # from the parsed network
    assert layers == Counter({f"mixport::{op}": n for op, n in nodes.items()})
    assert record.plugin_layer_count == sum(nodes.values())
    assert record.mixport_nodes == {"TopKRouting": nodes["TopKRouting"], "MoE": nodes["MoE"]}


def test_no_plugins_build_has_no_plugin_layers(engine_copy: Path) -> None:
    res = invoke("build", engine_copy, "--no-plugins")
    one_line_error(res, "built with other options", "plugins off (engine: on)", "--force")
    res = invoke("build", engine_copy, "--no-plugins", "--force")
    assert res.exit_code == 0, res.output
    record = Manifest.read(engine_copy).engine
    assert record.use_plugins is False and record.plugin_layers == [] and record.plugin_layer_count == 0


def test_up_to_date_engine_is_kept(engine_copy: Path) -> None:
    before = (engine_copy / "model.engine").stat().st_mtime_ns
    res = invoke("build", engine_copy)
    assert res.exit_code == 0 and "model.engine is up to date" in res.output, res.output
    assert (engine_copy / "model.engine").stat().st_mtime_ns == before
    one_line_error(invoke("build", engine_copy, "--batch", "1:2:8"), "other options", "batch (1, 2, 8)")


def test_reexport_makes_the_engine_stale_and_force_rebuilds(engine_copy: Path,
                                                            trt_module: ModuleType) -> None:
    old = Manifest.read(engine_copy).engine.sha256
    reexport_changed(engine_copy)
    ok, reason = engine_status(engine_copy, trt_module, gpu=None)
    assert not ok and "model.onnx changed since the engine was built" in reason
    one_line_error(invoke("build", engine_copy), "model.engine is stale", "model.onnx changed", "--force")
    res = invoke("build", engine_copy, "--force")
    assert res.exit_code == 0 and "built" in res.output, res.output
    record = Manifest.read(engine_copy).engine
    assert record.onnx_sha256 == artifact.file_sha256(engine_copy / "model.onnx")
    assert record.sha256 != old and engine_status(engine_copy, trt_module, gpu=None)[0]


def test_engine_status_reasons(engine_copy: Path, trt_module: ModuleType) -> None:
    ok, reason = engine_status(engine_copy, trt_module, gpu=None)
    assert ok and "built with" in reason
    ok, reason = engine_status(engine_copy, trt_module, gpu="sm75")
    assert not ok and "this GPU (sm75) is not among its targets" in reason
    if flavor_of(trt_module) == RTX:
        assert engine_status(engine_copy, trt_module, gpu="sm86") == (True, reason_for(engine_copy, "sm86"))
    manifest = Manifest.read(engine_copy)
    manifest = dataclasses.replace(manifest, engine=dataclasses.replace(manifest.engine, trt_version="0.0.1"))
    ok, reason = engine_status(engine_copy, trt_module, gpu=None, manifest=manifest)
    assert not ok and "engines run only with the TensorRT flavor and version that built them" in reason
    data = bytearray((engine_copy / "model.engine").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (engine_copy / "model.engine").write_bytes(bytes(data))
    ok, reason = engine_status(engine_copy, trt_module, gpu=None)
    assert not ok and "model.engine changed after it was built" in reason
    (engine_copy / "model.engine").unlink()
    assert engine_status(engine_copy, trt_module, gpu=None) == (False, "model.engine is missing")


def test_unchanged_engine_is_not_rehashed(engine_copy: Path, trt_module: ModuleType,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Size and mtime as recorded: the recorded sha256s are trusted, neither file is read."""
    hashed = count_hashes(monkeypatch)
    assert engine_status(engine_copy, trt_module, gpu=None)[0]
    assert hashed == []


def test_touched_engine_is_rehashed(engine_copy: Path, trt_module: ModuleType,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A new mtime makes status hash the engine again: same bytes -> still up to date (and the new
    mtime is remembered: no hash the next time); a changed byte of the same size -> stale."""
    engine = engine_copy / "model.engine"
    recorded = Manifest.read(engine_copy).engine.mtime_ns
    hashed = count_hashes(monkeypatch)
    os.utime(engine, ns=(recorded + 10**9, recorded + 10**9))  # touched: same bytes, new mtime
    assert engine_status(engine_copy, trt_module, gpu=None)[0]
    assert hashed == ["model.engine"]
    assert Manifest.read(engine_copy).engine.mtime_ns == recorded + 10**9
    hashed.clear()
    assert engine_status(engine_copy, trt_module, gpu=None)[0] and hashed == []
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    os.utime(engine, ns=(recorded + 2 * 10**9, recorded + 2 * 10**9))
    ok, reason = engine_status(engine_copy, trt_module, gpu=None)
    assert not ok and "model.engine changed after it was built" in reason
    assert hashed == ["model.engine"]


def reason_for(folder: Path, gpu: str) -> str:
    record = Manifest.read(folder).engine
    return (f"built with {record.trt} for {', '.join(record.targets)} from model.onnx "
            f"{record.onnx_sha256[:12]}..., runs on this {gpu}")


def test_gpu_mismatch_rules() -> None:
    def record(targets: list[str], gpu_at_build: str | None = None) -> EngineRecord:
        return EngineRecord(targets=targets, gpu_at_build=gpu_at_build)

    assert gpu_mismatch(record(["sm80", "sm86"]), "sm86") is None
    assert "not among its targets" in gpu_mismatch(record(["sm80", "sm86"]), "sm90")
    assert gpu_mismatch(record(["ampere+"]), "sm90") is None
    assert "sm80+" in gpu_mismatch(record(["ampere+"]), "sm75")
    assert gpu_mismatch(record(["current"], "sm89"), "sm89") is None
    assert "build machine's GPU (sm89)" in gpu_mismatch(record(["current"], "sm89"), "sm90")


@pytest.mark.parametrize(("args", "fragments"), [
    (["--targets", "sm999"], ["unsupported build target", "sm999"]),
    (["--dtype", "fp16"], ["requested dtype differs from the export's", "fp16", "expected: fp32"]),
])
def test_bad_options_are_one_line_errors(export_copy: Path, trt_module: ModuleType, args: list[str],
                                         fragments: list[str]) -> None:
    one_line_error(invoke("build", export_copy, *args), *fragments)
    assert not (export_copy / "model.engine").exists() and Manifest.read(export_copy).engine is None


@pytest.mark.parametrize(("args", "fragments"), [
    (["--dtype", "int8"], ["Invalid value for '--dtype'", "'int8' is not one of", "'fp32', 'fp16', 'bf16'"]),
    (["--batch", "4:1:2"], ["Invalid value for '--batch'", "'4:1:2' is not MIN:OPT:MAX", "MIN <= OPT <= MAX"]),
    (["--seq", "x"], ["Invalid value for '--seq'", "'x' is not MIN:OPT:MAX"]),
    (["--past", "1:2"], ["Invalid value for '--past'", "'1:2' is not MIN:OPT:MAX"]),
    (["--batch", "-1"], ["Invalid value for '--batch'", "'-1' is not MIN:OPT:MAX"]),
])
def test_bad_option_values_are_usage_errors(export_copy: Path, args: list[str], fragments: list[str]) -> None:
    """Values no build could take: click's usage message and exit 2, before anything is read."""
    res = invoke("build", export_copy, *args)
    assert res.exit_code == 2, res.output
    assert "Usage: main build [OPTIONS] OUT_DIR" in res.output and "Traceback" not in res.output
    for fragment in fragments:
        assert fragment in res.output, res.output
    assert not (export_copy / "model.engine").exists() and Manifest.read(export_copy).engine is None


def test_ranges_reach_the_build_request(export_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What --batch/--seq/--past parse to (N means N:N:N), as the library receives it."""
    from mixport.engine import folder as engine_folder

    seen = []

    def build_folder(out: Path, request: engine_folder.BuildRequest, progress: object) -> SimpleNamespace:
        seen.append(request)
        return SimpleNamespace(message="built")

    monkeypatch.setattr(engine_folder, "build_folder", build_folder)
    res = invoke("build", export_copy, "--batch", "1:2:8", "--seq", "16", "--dtype", "fp32")
    assert res.exit_code == 0, res.output
    assert (seen[0].batch, seen[0].seq, seen[0].past, seen[0].dtype) == ((1, 2, 8), (16, 16, 16), None, "fp32")


class _NoFullTensorRT(importlib.abc.MetaPathFinder):
    """``import tensorrt`` fails as where full TensorRT is not installed (the bindings stay importable)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "tensorrt" or name.startswith("tensorrt."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


@pytest.fixture
def without_full_tensorrt(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Hides full TensorRT where it is installed (nothing to hide elsewhere): the test runs on every machine."""
    if importlib.util.find_spec("tensorrt") is None:
        yield
        return
    for name in [m for m in sys.modules if m == "tensorrt" or m.startswith("tensorrt.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_NoFullTensorRT(), *sys.meta_path])
    _import_trt.cache_clear()
    yield
    _import_trt.cache_clear()


def test_no_tensorrt_names_the_packages(export_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                        without_full_tensorrt: None) -> None:
    monkeypatch.setenv("MIXPORT_TRT", "tensorrt")
    line = one_line_error(invoke("build", export_copy), "TensorRT is not installed", "No module named 'tensorrt'")
    assert re.search(r"pip install 'mixport\[trt\]'.*tensorrt-rtx-cu13-libs.*pip install tensorrt", line)


def test_not_an_export_folder(tmp_path: Path) -> None:
    one_line_error(invoke("build", tmp_path), "not a mixport export folder")


@pytest.mark.slow
def test_export_with_engine_end_to_end(tmp_path: Path, trt_module: ModuleType) -> None:
    out = tmp_path / "out"
    res = invoke("export", "--model", "tiny", "-o", out, "--engine", "--no-check")
    assert res.exit_code == 0, res.output
    record = Manifest.read(out).engine
    assert (out / "model.engine").stat().st_size == record.bytes
    assert record.plugin_layer_count == sum(_mixport_nodes(out).values()) > 0
    assert engine_status(out, trt_module, gpu=None)[0]
    shutil.rmtree(out)
