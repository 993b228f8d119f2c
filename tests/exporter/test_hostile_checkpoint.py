"""Hostile model folders (issue 10, items 2 and 6): shard names that leave the folder, damaged
safetensors headers, bool weights, NaN/Inf weights. Every bad file is real bytes (struct +
json, or safetensors' own writer); each ends in one `error:` line, exit 1, nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from mixport.errors import CheckpointError
from mixport.exporter.checkpoint import INDEX, check_safetensors, safetensors_files
from tests.helpers import invoke, one_line_error

Header = dict[str, Any]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _read(path: Path) -> tuple[Header, bytes]:
    """A safetensors file's header (parsed) and its data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path: Path, header: object, data: bytes) -> None:
    """A safetensors file from a header (any JSON value) and data bytes."""
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


def _tensors(header: Header) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def _export_fails(src: Path, tmp_path: Path, *fragments: str) -> str:
    """`mixport export SRC -o OUT` ends in one error line with the fragments; no OUT, no staging."""
    out = tmp_path / "out"
    result = invoke("export", src, "-o", out)
    line = one_line_error(result, *fragments)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name], "a staging folder was left behind"
    return line


def _edit_header(tiny_dir: Path, tmp_path: Path, change: Callable[[Header, bytes], tuple[object, bytes]]) -> Path:
    src = _copy(tiny_dir, tmp_path / "m")
    header, data = _read(src / "model.safetensors")
    new_header, new_data = change(header, data)
    _write(src / "model.safetensors", new_header, new_data)
    return src


def _entry(header: Header, i: int = 0) -> dict[str, Any]:
    return header[_tensors(header)[i]]


def _set(i: int, **fields: object) -> Callable[[Header, bytes], tuple[object, bytes]]:
    def change(header: Header, data: bytes) -> tuple[object, bytes]:
        entry = _entry(header, i)
        for key, value in fields.items():
            if value is None:
                entry.pop(key)
            else:
                entry[key] = value
        return header, data
    return change


# ---- the header ------------------------------------------------------------------------------

def test_header_is_a_list(tiny_dir: Path, tmp_path: Path) -> None:
    src = _edit_header(tiny_dir, tmp_path, lambda h, d: ([h], d))
    _export_fails(src, tmp_path, "model.safetensors", "not a JSON object", "a JSON list")


def test_tensor_entry_is_not_an_object(tiny_dir: Path, tmp_path: Path) -> None:
    def change(header: Header, data: bytes) -> tuple[object, bytes]:
        header[_tensors(header)[0]] = [1, 2]
        return header, data
    _export_fails(_edit_header(tiny_dir, tmp_path, change), tmp_path, "is not an object")


@pytest.mark.parametrize("offsets", [None, "0-8", [0], [0, 8, 16], [-8, 0], [0.0, 8.0], [True, 8]],
                         ids=["missing", "string", "one", "three", "negative", "floats", "bool"])
def test_malformed_data_offsets(tiny_dir: Path, tmp_path: Path, offsets: object) -> None:
    src = _edit_header(tiny_dir, tmp_path, _set(0, data_offsets=offsets))
    _export_fails(src, tmp_path, "malformed data_offsets")


def test_reversed_offsets(tiny_dir: Path, tmp_path: Path) -> None:
    def change(header: Header, data: bytes) -> tuple[object, bytes]:
        start, end = _entry(header)["data_offsets"]
        _entry(header)["data_offsets"] = [end, start]
        return header, data
    _export_fails(_edit_header(tiny_dir, tmp_path, change), tmp_path, "malformed data_offsets")


@pytest.mark.parametrize("dtype", ["F99", None, 4, "f32"])
def test_unknown_dtype(tiny_dir: Path, tmp_path: Path, dtype: object) -> None:
    src = _edit_header(tiny_dir, tmp_path, _set(0, dtype=dtype))
    _export_fails(src, tmp_path, "unknown dtype")


@pytest.mark.parametrize("shape", [[3, 3], [-1, 16], "16", [2.0, 8], None])
def test_shape_does_not_match_the_span(tiny_dir: Path, tmp_path: Path, shape: object) -> None:
    src = _edit_header(tiny_dir, tmp_path, _set(0, shape=shape))
    _export_fails(src, tmp_path, _tensors(_read(src / "model.safetensors")[0])[0])


def test_shape_byte_mismatch_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    src = _edit_header(tiny_dir, tmp_path, _set(0, shape=[1]))
    _export_fails(src, tmp_path, "does not match its byte span", "end - start == product(shape) * dtype size")


def test_overlapping_spans(tiny_dir: Path, tmp_path: Path) -> None:
    """Two tensors of one size pointing at the same bytes: each span is valid on its own."""
    def change(header: Header, data: bytes) -> tuple[object, bytes]:
        names = _tensors(header)
        a = next(n for n in names if "experts.0.w1" in n)
        b = next(n for n in names if "experts.1.w1" in n)
        header[b]["data_offsets"] = list(header[a]["data_offsets"])
        return header, data
    _export_fails(_edit_header(tiny_dir, tmp_path, change), tmp_path, "overlap")


@pytest.mark.parametrize("metadata", [["format", "pt"], {"format": 5}, {"format": None}, "pt"])
def test_metadata_not_a_string_map(tiny_dir: Path, tmp_path: Path, metadata: object) -> None:
    def change(header: Header, data: bytes) -> tuple[object, bytes]:
        header["__metadata__"] = metadata
        return header, data
    _export_fails(_edit_header(tiny_dir, tmp_path, change), tmp_path, "__metadata__")


def test_bool_tensor_refused_by_name(tiny_dir: Path, tmp_path: Path) -> None:
    def change(header: Header, data: bytes) -> tuple[object, bytes]:
        header["model.extra_mask"] = {"dtype": "BOOL", "shape": [4], "data_offsets": [len(data), len(data) + 4]}
        return header, data + b"\x01\x00\x01\x00"
    _export_fails(_edit_header(tiny_dir, tmp_path, change), tmp_path, "model.extra_mask", "bool")


def test_a_valid_header_passes(tiny_dir: Path, tmp_path: Path) -> None:
    """The checks refuse only what is wrong: the tiny model's own file, rewritten, passes."""
    src = _edit_header(tiny_dir, tmp_path, lambda h, d: (h, d))
    check_safetensors(src / "model.safetensors")


# ---- NaN / Inf in a weight --------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weight_refused_by_name(tiny_dir: Path, tmp_path: Path, bad: float) -> None:
    src = _copy(tiny_dir, tmp_path / "m")
    state = load_file(src / "model.safetensors")
    name = next(n for n in sorted(state) if "experts.2.w2" in n)
    state[name] = state[name].clone()
    state[name][1, 3] = bad
    save_file(state, src / "model.safetensors")
    _export_fails(src, tmp_path, name, "NaN or Inf")


# ---- the index ---------------------------------------------------------------------------------

def _sharded(tiny_dir: Path, folder: Path) -> dict[str, str]:
    """FOLDER with the tiny model in two shards + the index; returns the weight map."""
    folder.mkdir()
    shutil.copy(tiny_dir / "config.json", folder)
    state = load_file(tiny_dir / "model.safetensors")
    names = sorted(state)
    weight_map: dict[str, str] = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, folder / shard)
        weight_map.update({n: shard for n in part})
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


@pytest.mark.parametrize("index", [
    [], {"weight_map": []}, {"weight_map": "model.safetensors"}, {"weight_map": {"a.weight": 5}},
    {"weight_map": {"a.weight": None}}, {"weight_map": {"a.weight": ""}}, {"metadata": {}}],
    ids=["top-list", "map-list", "map-string", "value-int", "value-null", "value-empty", "no-map"])
def test_malformed_index(tiny_dir: Path, tmp_path: Path, index: object) -> None:
    src = tmp_path / "m"
    _sharded(tiny_dir, src)
    (src / INDEX).write_text(json.dumps(index))
    _export_fails(src, tmp_path, "malformed safetensors index", INDEX)


def test_shard_outside_the_folder_is_never_read(tiny_dir: Path, tmp_path: Path) -> None:
    """`../outside.safetensors` in the index: refused before it is opened (it would load: the
    file is a complete, valid checkpoint)."""
    src = tmp_path / "m"
    weight_map = _sharded(tiny_dir, src)
    shutil.copy(tiny_dir / "model.safetensors", tmp_path / "outside.safetensors")
    (src / INDEX).write_text(json.dumps({"weight_map": {n: "../outside.safetensors" for n in weight_map}}))
    out = tmp_path / "out"
    line = one_line_error(invoke("export", src, "-o", out), "../outside.safetensors", "outside the model folder")
    assert "Traceback" not in line and not out.exists()


def test_absolute_shard_name(tiny_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "m"
    weight_map = _sharded(tiny_dir, src)
    shutil.copy(tiny_dir / "model.safetensors", tmp_path / "abs.safetensors")
    absolute = str(tmp_path / "abs.safetensors")
    (src / INDEX).write_text(json.dumps({"weight_map": {n: absolute for n in weight_map}}))
    with pytest.raises(CheckpointError, match="outside the model folder"):
        safetensors_files(src)
    one_line_error(invoke("export", src, "-o", tmp_path / "out"), "outside the model folder")


def test_shard_symlink_resolving_outside(tiny_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "m"
    weight_map = _sharded(tiny_dir, src)
    shard = weight_map[next(iter(weight_map))]
    outside = tmp_path / "elsewhere.safetensors"
    (src / shard).rename(outside)
    os.symlink(outside, src / shard)
    one_line_error(invoke("export", src, "-o", tmp_path / "out"), "symlink", "outside the model folder")


def test_single_file_symlink_resolving_outside(tiny_dir: Path, tmp_path: Path) -> None:
    src = _copy(tiny_dir, tmp_path / "m")
    (src / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", src / "model.safetensors")
    one_line_error(invoke("export", src, "-o", tmp_path / "out"), "symlink", "outside the model folder")


def test_symlinks_inside_the_folder_and_a_hub_cache_are_read(tiny_dir: Path, tmp_path: Path) -> None:
    """What a Hugging Face cache looks like (snapshots/<rev>/x -> ../../blobs/<sha>) still loads,
    and so does a link to another file of the folder."""
    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    shutil.copy(tiny_dir / "model.safetensors", blobs / "0123abcd")
    os.symlink("../../blobs/0123abcd", snap / "model.safetensors")
    assert safetensors_files(snap) == [snap / "model.safetensors"]
    inside = _copy(tiny_dir, tmp_path / "inside")
    (inside / "model.safetensors").rename(inside / "real.bin")
    os.symlink("real.bin", inside / "model.safetensors")
    assert safetensors_files(inside) == [inside / "model.safetensors"]
