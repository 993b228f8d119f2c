"""Every path that comes from a folder stays inside it (issue 10, item 2): ONNX external-data
locations for every command that loads a model (optimize, run, bench, check, build's parser)
and the engine file a manifest names. Each is refused before the file is opened, in one line.
(Safetensors shard names: tests/exporter/test_hostile_checkpoint.py.)"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mixport import artifact, onnx_io
from mixport.artifact import EngineRecord, Manifest
from mixport.errors import FileSystemError, RuntimeFailure
from tests.helpers import invoke, one_line_error

N = 1024  # floats: 4 KiB, stored apart (past onnx_io.SMALL)
SECRET = (b"SECRET-" * 600)[: 4 * N]


def _pointing(tensor: TensorProto, location: str, length: int) -> None:
    """Make ``tensor`` external data at ``location`` (offset 0)."""
    tensor.ClearField("raw_data")
    del tensor.float_data[:]
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _model(folder: Path, location: str) -> Path:
    """FOLDER/model.onnx: y = w + 0, w a 4 KiB float initializer stored at ``location``."""
    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.zeros(N, np.float32), "w")
    _pointing(w, location, 4 * N)
    zero = numpy_helper.from_array(np.zeros(N, np.float32), "zero")
    graph = helper.make_graph([helper.make_node("Add", ["w", "zero"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [N])], [w, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "model.onnx"
    onnx.save_model(model, str(path))
    return path


def _files_holding_secret(root: Path, secret_file: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and p != secret_file
            and SECRET[:64] in p.read_bytes()]


# ---- mixport optimize --------------------------------------------------------------------------

def test_optimize_refuses_dot_dot_location(tmp_path: Path) -> None:
    """The reported attack: `location='../../etc/passwd'` exited 0 and copied the file's bytes
    into the output, because the output's folder (here the scratch root) was trusted."""
    secret = tmp_path / "etc" / "passwd"
    secret.parent.mkdir()
    secret.write_bytes(SECRET)
    src = _model(tmp_path / "a" / "b", "../../etc/passwd")
    dst = tmp_path / "out.onnx"
    one_line_error(invoke("optimize", src, "-o", dst), "'../../etc/passwd'", "outside the model's folder", "'..'")
    assert not dst.exists()
    assert not _files_holding_secret(tmp_path, secret)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "etc"], "work files left behind"


def _location(kind: str, tmp_path: Path, folder: Path) -> str:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "absolute":
        return str(secret)
    if kind == "symlink":
        os.symlink(secret, folder / "w.data")
        return "w.data"
    if kind == "symlinked-folder":
        os.symlink(tmp_path, folder / "up")
        return "up/secret.bin"
    if kind == "inner-dot-dot":
        (folder / "sub").mkdir()
        return "sub/../../secret.bin"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["absolute", "symlink", "symlinked-folder", "inner-dot-dot"])
def test_optimize_refuses_locations_outside(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "m"
    src = _model(folder, _location(kind, tmp_path, folder))
    dst = tmp_path / "out.onnx"
    one_line_error(invoke("optimize", src, "-o", dst), "outside the model's folder", "tensor 'w'")
    assert not dst.exists()
    assert not _files_holding_secret(tmp_path, tmp_path / "secret.bin")


def test_optimize_reads_data_inside_the_folder(tmp_path: Path) -> None:
    """The check refuses only what leaves the folder: a file in a subfolder is read."""
    folder = tmp_path / "m"
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "w.data").write_bytes(np.arange(N, dtype=np.float32).tobytes())
    src = _model(folder, "weights/w.data")
    dst = tmp_path / "out" / "fused.onnx"
    dst.parent.mkdir()
    result = invoke("optimize", src, "-o", dst)
    assert result.exit_code == 0, result.output
    out = onnx.load(str(dst))
    w = next(t for t in out.graph.initializer if t.name == "w")
    np.testing.assert_array_equal(numpy_helper.to_array(w), np.arange(N, dtype=np.float32))


@pytest.mark.parametrize("location,why", [("", "empty"), ("missing.data", "missing"), ("..", "'..'"),
                                          ("C:/x.data", "absolute")])
def test_check_external_locations_refuses(tmp_path: Path, location: str, why: str) -> None:
    path = _model(tmp_path / "m", location)
    with pytest.raises(FileSystemError, match=why):
        onnx_io.check_external_locations(path)


def test_check_external_locations_covers_node_attributes(tmp_path: Path) -> None:
    """A Constant node's tensor attribute (in a function body too) is checked like an initializer."""
    folder = tmp_path / "m"
    path = _model(folder, "w.data")
    (folder / "w.data").write_bytes(bytes(4 * N))
    onnx_io.check_external_locations(path)
    model = onnx.load(str(path), load_external_data=False)
    value = numpy_helper.from_array(np.zeros(N, np.float32), "c")
    _pointing(value, "../secret.bin", 4 * N)
    body = helper.make_node("Constant", [], ["c"], value=value)
    model.functions.append(helper.make_function("evil", "F", [], ["c"], [body], [helper.make_opsetid("", 17)]))
    onnx.save_model(model, str(path))
    with pytest.raises(FileSystemError, match="'../secret.bin'"):
        onnx_io.check_external_locations(path)


# ---- an export folder whose model.onnx points outside: run, bench, check, build ----------------

@pytest.fixture
def evil_export(export_copy: Path, tmp_path: Path) -> Path:
    """The tiny export with its biggest initializer moved to ../secret.bin (outside the folder),
    the manifest's hash updated to match: only the location is wrong."""
    path = export_copy / artifact.MODEL_FILE
    model = onnx.load(str(path))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    (export_copy.parent / "secret.bin").write_bytes(tensor.raw_data)
    _pointing(tensor, "../secret.bin", len(tensor.raw_data))
    onnx.save_model(model, str(path))
    manifest = Manifest.read(export_copy)
    dataclasses.replace(manifest, onnx_sha256=artifact.file_sha256(path), stamps={}).write(export_copy)
    return export_copy


@pytest.mark.parametrize("graph", ["portable", "fast"])
def test_run_refuses_before_onnx_runtime_opens(evil_export: Path, graph: str) -> None:
    result = invoke("run", evil_export, "--prompt", "hi", "--max-new-tokens", "2", "--graph", graph,
                    "--backend", "onnxruntime")
    one_line_error(result, "'../secret.bin'", "outside the model's folder")


def test_bench_refuses(evil_export: Path) -> None:
    result = invoke("bench", evil_export, "--prompt-len", "2", "--new-tokens", "2", "--runs", "1",
                    "--graph", "portable", "--backend", "onnxruntime")
    one_line_error(result, "'../secret.bin'", "outside the model's folder")


def test_check_refuses(evil_export: Path) -> None:
    one_line_error(invoke("check", evil_export, "--steps", "1"), "'../secret.bin'", "outside the model's folder")


def test_build_refuses_before_the_parser(evil_export: Path, tmp_path: Path) -> None:
    """build's two readers of model.onnx: the constant folding step and TensorRT's parser (the
    check runs before the parser is made, so no TensorRT is needed to prove it)."""
    from mixport.engine.network import parse_onnx
    from mixport.engine.prepare import prepare_for_parser

    model_path = evil_export / artifact.MODEL_FILE
    with pytest.raises(FileSystemError, match="outside the model's folder"):
        prepare_for_parser(model_path, tmp_path)
    with pytest.raises(FileSystemError, match="outside the model's folder"):
        parse_onnx(None, None, None, model_path, True)  # type: ignore[arg-type]


def test_the_untouched_export_still_runs(export_copy: Path) -> None:
    onnx_io.check_external_locations(export_copy / artifact.MODEL_FILE)
    result = invoke("run", export_copy, "--prompt", "hi", "--max-new-tokens", "2", "--graph", "portable",
                    "--backend", "onnxruntime")
    assert result.exit_code == 0, result.output


# ---- the engine file a manifest names ----------------------------------------------------------

def _with_engine(folder: Path, file: str) -> None:
    manifest = Manifest.read(folder)
    record = EngineRecord(file=file, sha256="0" * 64, bytes=4, onnx_sha256=manifest.onnx_sha256)
    dataclasses.replace(manifest, engine=record).write(folder)


@pytest.mark.parametrize("name", ["../x.engine", "/etc/passwd", "sub/model.engine", "..", "", "a\\b.engine"])
def test_manifest_engine_file_must_be_a_plain_name(export_copy: Path, name: str) -> None:
    (export_copy.parent / "x.engine").write_bytes(b"ENGN")
    _with_engine(export_copy, name)
    with pytest.raises(RuntimeFailure, match="engine.file"):
        Manifest.read(export_copy)
    one_line_error(invoke("run", export_copy, "--prompt", "hi", "--max-new-tokens", "2"), "engine.file")


def test_engine_symlink_resolving_outside_is_never_read(export_copy: Path) -> None:
    from mixport.engine.status import engine_status

    outside = export_copy.parent / "x.engine"
    outside.write_bytes(b"ENGN")
    os.symlink(outside, export_copy / artifact.ENGINE_FILE)
    _with_engine(export_copy, artifact.ENGINE_FILE)
    with pytest.raises(RuntimeFailure, match="outside the export folder"):
        artifact.folder_file(export_copy, artifact.ENGINE_FILE)
    with pytest.raises(RuntimeFailure, match="outside the export folder"):
        engine_status(export_copy, None, gpu=None)  # type: ignore[arg-type]


def test_a_plain_engine_name_is_accepted(export_copy: Path) -> None:
    _with_engine(export_copy, artifact.ENGINE_FILE)
    assert Manifest.read(export_copy).engine.file == artifact.ENGINE_FILE  # type: ignore[union-attr]
    assert artifact.folder_file(export_copy, artifact.ENGINE_FILE) == export_copy / artifact.ENGINE_FILE
