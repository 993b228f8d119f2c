"""The export folder (mixport.artifact): the typed manifest, atomic writes, and checked weights."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from mixport import artifact
from mixport.artifact import MANIFEST_VERSION, EngineRecord, Manifest, Stamp
from mixport.errors import RuntimeFailure
from tests.helpers import count_hashes, invoke, one_line_error

OLD_KEYS = ("mixport_version", "source", "config_sha256", "dtype", "opset", "onnx_sha256", "fused", "passes",
            "target", "files", "config", "inputs", "outputs")  # what manifests held before "version"


def _json(folder: Path) -> dict:
    return json.loads((folder / artifact.MANIFEST).read_text())


def test_export_writes_a_typed_versioned_manifest(tiny_dir: Path, tiny_export: Path) -> None:
    manifest = Manifest.read(tiny_export)
    assert _json(tiny_export)["version"] == MANIFEST_VERSION == manifest.version
    assert manifest.source == artifact.Source(path=str(tiny_dir.absolute()))
    assert _json(tiny_export)["source"] == {"path": str(tiny_dir.absolute())}
    assert manifest.onnx_sha256 == artifact.file_sha256(tiny_export / artifact.MODEL_FILE)
    assert manifest.data_sha256 is None and artifact.DATA_FILE not in manifest.files  # small: one file
    onnx_stat = (tiny_export / artifact.MODEL_FILE).stat()
    assert manifest.stamps == {artifact.MODEL_FILE: Stamp(manifest.onnx_sha256, onnx_stat.st_size,
                                                          onnx_stat.st_mtime_ns)}
    assert manifest.fused and manifest.passes["fuse_moe_experts"] > 0 and manifest.target == "portable"
    assert [i.name for i in manifest.inputs][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert manifest.inputs[0].dtype == "int64" and manifest.inputs[0].shape == ["batch", "seq"]
    assert manifest.engine is None  # (ort_graph appears once a test has run the folder on CPU)
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest


def test_a_manifest_without_version_is_read_and_checked(export_copy: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder exported before manifests had a version (0): read as is, model.onnx checked by
    its sha256 (hashed, as nothing vouches for it), then its stamp is remembered."""
    old = {k: v for k, v in _json(export_copy).items() if k in OLD_KEYS}
    (export_copy / artifact.MANIFEST).write_text(json.dumps(old))
    manifest = Manifest.read(export_copy)
    assert manifest.version == 0 and manifest.stamps == {} and manifest.onnx_sha256 == old["onnx_sha256"]
    hashed = count_hashes(monkeypatch)
    assert artifact.validate_folder(export_copy, manifest) == export_copy / artifact.MODEL_FILE
    assert hashed == [artifact.MODEL_FILE]
    again = Manifest.read(export_copy)
    assert again.version == MANIFEST_VERSION and set(again.stamps) == {artifact.MODEL_FILE}
    assert {k: v for k, v in _json(export_copy).items() if k in OLD_KEYS} == old
    hashed.clear()
    artifact.validate_folder(export_copy, again)
    assert hashed == []


def test_unknown_fields_are_kept_when_rewritten(export_copy: Path) -> None:
    data = _json(export_copy)
    data["architecture"] = "mixtral"
    data["engine"] = {"file": "model.engine", "sha256": "0" * 64, "bytes": 3, "kernels": ["moe"]}
    manifest = Manifest.from_dict(data)
    assert manifest.extra == {"architecture": "mixtral"} and manifest.engine.extra == {"kernels": ["moe"]}
    dataclasses.replace(manifest, dtype="fp32").write(export_copy)
    back = _json(export_copy)
    assert back["architecture"] == "mixtral" and back["engine"]["kernels"] == ["moe"]


@pytest.mark.parametrize(("change", "fragments"), [
    (lambda m: m.update(engine={"file": "model.engine", "bytes": "3"}),
     ["manifest.json is malformed", 'engine.bytes is "3"', "expected: an integer"]),
    (lambda m: m.pop("config"), ["manifest.json is malformed", "config is missing"]),
    (lambda m: m.update(inputs=[{"name": "x", "dtype": "int64", "shape": [1.5]}]),
     ["manifest.json is malformed", "inputs[0].shape[0] is 1.5"]),
    (lambda m: m.update(dtype=None), ["manifest.json is malformed", "dtype is null", "expected: a string"]),
    (lambda m: m.update(version=MANIFEST_VERSION + 1),
     ["manifest.json is of a newer format", f"version {MANIFEST_VERSION + 1}", "pip install -U mixport"]),
    (lambda m: m.update(version="1"), ["manifest.json is malformed", 'version is "1"']),
])
def test_malformed_or_newer_manifest_is_one_line(export_copy: Path, change: object,
                                                 fragments: list[str]) -> None:
    data = _json(export_copy)
    change(data)  # type: ignore[operator]
    (export_copy / artifact.MANIFEST).write_text(json.dumps(data))
    line = one_line_error(invoke("run", export_copy, "--prompt", "x"), *fragments)
    assert str(export_copy / artifact.MANIFEST) in line
    with pytest.raises(RuntimeFailure, match=fragments[0]):
        Manifest.read(export_copy)


def test_not_a_json_object(export_copy: Path) -> None:
    (export_copy / artifact.MANIFEST).write_text("[1, 2]")
    one_line_error(invoke("run", export_copy, "--prompt", "x"), "manifest.json is malformed", "the top level is a list")
    (export_copy / artifact.MANIFEST).write_text("{")
    one_line_error(invoke("run", export_copy, "--prompt", "x"), "manifest.json is not valid JSON")


def test_engine_record_defaults_are_the_old_readers_defaults() -> None:
    record = Manifest.from_dict({"config": {}, "engine": {"sha256": "ab"}}).engine
    assert record == EngineRecord(sha256="ab")
    assert (record.file, record.bytes, record.use_plugins, record.mtime_ns) == ("model.engine", -1, True, None)


def test_loading_an_unchanged_folder_hashes_nothing(export_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `mixport run` checks (model.onnx, the fast graph) is trusted by size and mtime."""
    from mixport.runtime import load

    load(export_copy, threads=1, graph="fast").close()  # builds and records model.ort.onnx
    record = Manifest.read(export_copy).ort_graph
    path = export_copy / record.file
    assert (record.sha256, record.bytes, record.mtime_ns) == (
        artifact.file_sha256(path), path.stat().st_size, path.stat().st_mtime_ns)
    hashed = count_hashes(monkeypatch)
    load(export_copy, threads=1, graph="fast").close()
    assert hashed == []


# ---- atomic_write -----------------------------------------------------------------------------

@pytest.fixture
def umask_027() -> Iterator[int]:
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def test_atomic_write_replaces_with_companions_and_the_umask_mode(tmp_path: Path, umask_027: int) -> None:
    target = tmp_path / "model.onnx"
    target.write_text("old")
    with artifact.atomic_write(target) as tmp:
        assert tmp.name == "model.onnx" and tmp.parent != tmp_path and tmp.parent.name.startswith(".")
        assert target.read_text() == "old"  # nothing visible until the block ends
        tmp.write_text("new")
        tmp.with_name("model.onnx.data").write_text("weights")  # a companion: published
        (tmp.parent / ".fused.data").write_text("work")  # anything else: dropped
    assert target.read_text() == "new" and (tmp_path / "model.onnx.data").read_text() == "weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    for path in tmp_path.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask_027


def test_atomic_write_error_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), artifact.atomic_write(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


# ---- model.onnx.data: recorded, checked, hashed once --------------------------------------------

@pytest.fixture(scope="module")
def external_export(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny model exported in the layout of a model past 2 GB (weights in model.onnx.data):
    the size limit is lowered for the export, as tools/bench_export.py --external-data does."""
    from mixport.exporter.export import export

    out = tmp_path_factory.mktemp("external") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(artifact, "TWO_GB", 1 << 16)
        export(tiny_dir, out)
    yield out


@pytest.fixture
def external_copy(external_export: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(external_export, tmp_path / "external"))


def test_the_data_file_is_recorded(external_export: Path) -> None:
    manifest = Manifest.read(external_export)
    data = external_export / artifact.DATA_FILE
    assert artifact.DATA_FILE in manifest.files and data.stat().st_size > (1 << 16)
    assert manifest.data_sha256 == artifact.file_sha256(data)
    assert manifest.stamps[artifact.DATA_FILE] == Stamp(manifest.data_sha256, data.stat().st_size,
                                                        data.stat().st_mtime_ns)


def test_the_data_file_is_hashed_only_when_touched(external_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed = count_hashes(monkeypatch)
    artifact.validate_folder(external_copy, Manifest.read(external_copy))
    assert hashed == []  # size and mtime as recorded: trusted
    data = external_copy / artifact.DATA_FILE
    mtime = data.stat().st_mtime_ns + 10**9
    os.utime(data, ns=(mtime, mtime))
    artifact.validate_folder(external_copy, Manifest.read(external_copy))
    assert hashed == [artifact.DATA_FILE]  # rehashed once, same bytes: its new mtime is remembered
    assert Manifest.read(external_copy).stamps[artifact.DATA_FILE].mtime_ns == mtime
    hashed.clear()
    artifact.validate_folder(external_copy, Manifest.read(external_copy))
    assert hashed == []


def test_a_changed_byte_of_the_data_file_is_one_error_line(external_copy: Path) -> None:
    data = external_copy / artifact.DATA_FILE
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # same size: only the hash can tell
    data.write_bytes(bytes(raw))
    line = one_line_error(invoke("run", external_copy, "--prompt", "x"), "model.onnx.data does not match the manifest",
                          "restore the original model.onnx.data")
    assert str(data) in line
    data.unlink()
    one_line_error(invoke("run", external_copy, "--prompt", "x"), "the export folder has no model.onnx.data")
