"""Never destroy what the user did not ask to replace (issue 10, item 3; item 16: the folder's mode).

`mixport export SRC -o OUT` refuses an OUT that is SRC, inside it or holds it (symlinks resolved),
before anything is touched; `--force` replaces only an empty folder or one mixport wrote (its
manifest.json parses); `mixport optimize IN -o OUT` never writes over IN or the weights IN reads.
A refusal is one `error:` line, exit 1, and every byte where it was.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mixport import artifact
from mixport.errors import OutputExistsError
from tests.helpers import invoke, one_line_error


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every path under ROOT (ROOT included) -> its bytes, a link's target, or "dir"."""
    found: dict[str, bytes | str] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        rel = str(path.relative_to(root.parent))
        found[rel] = (f"-> {os.readlink(path)}" if path.is_symlink() else
                      "dir" if path.is_dir() else path.read_bytes())
    return found


def leftovers(folder: Path) -> list[str]:
    """Hidden staging / replaced folders mixport may have left in FOLDER."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture
def src(tiny_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny Hugging Face folder: the user's source checkpoint."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "src"))


# ---- export: OUT and SRC ----------------------------------------------------------------------

@pytest.mark.parametrize("where", ["same", "same-spelled-otherwise", "inside", "symlink-to-src", "holds-src"])
def test_export_onto_its_source_is_refused_and_the_source_is_untouched(where: str, src: Path,
                                                                     tmp_path: Path) -> None:
    """`export SRC -o SRC --force` deleted the source checkpoint; now nothing is touched."""
    source = src
    if where == "same":
        out = src
    elif where == "same-spelled-otherwise":
        out = src / ".." / "src"
    elif where == "inside":
        out = src / "onnx"
    elif where == "symlink-to-src":
        out = tmp_path / "link"
        out.symlink_to(src, target_is_directory=True)
    else:  # OUT is an export folder (a mixport manifest) that holds the source folder
        out = tmp_path / "export"
        out.mkdir()
        (out / artifact.MANIFEST).write_text(json.dumps({"mixport_version": "0.1.0", "config": {}}))
        source = Path(shutil.move(src, out / "src"))
    before = snapshot(tmp_path)
    one_line_error(invoke("export", source, "-o", out, "--force", "--no-check"),
                   "the output folder is the source folder, inside it or holds it")
    assert snapshot(tmp_path) == before


def test_force_refuses_a_folder_mixport_did_not_write(src: Path, tmp_path: Path) -> None:
    mine = tmp_path / "photos"
    (mine / "2024").mkdir(parents=True)
    (mine / "2024" / "a.jpg").write_bytes(b"\xff\xd8 not a model")
    before = snapshot(tmp_path)
    line = one_line_error(invoke("export", src, "-o", mine, "--force", "--no-check"),
                          "--force replaces only a folder mixport wrote", str(mine))
    assert "hint:" in line
    assert snapshot(tmp_path) == before


def test_force_refuses_a_file_and_leaves_no_old_copy(src: Path, tmp_path: Path) -> None:
    """A file at OUT is not an export folder: refused (it used to be replaced and kept as .OUT.old-PID)."""
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    before = snapshot(tmp_path)
    one_line_error(invoke("export", src, "-o", afile, "--force", "--no-check"), "not a folder")
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []


def test_force_replaces_an_empty_folder_and_a_mixport_folder(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    res = invoke("export", src, "-o", out, "--force", "--no-check")  # an empty folder
    assert res.exit_code == 0, res.output
    first = artifact.Manifest.read(out)
    (out / "stray.txt").write_text("left by the user in the export folder")
    res = invoke("export", src, "-o", out, "--force", "--no-check", "--no-fuse")  # a folder mixport wrote
    assert res.exit_code == 0, res.output
    assert artifact.Manifest.read(out).fused is False and first.fused is True
    assert not (out / "stray.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"], leftovers(tmp_path)


def test_check_target_rules(tmp_path: Path) -> None:
    """What --force may replace, without an export: a damaged mixport manifest still counts (the
    error for a damaged folder says to export again with --force); a manifest.json that is not
    mixport's does not."""
    folder = tmp_path / "f"
    folder.mkdir()
    artifact.check_target(folder, force=True)  # empty
    (folder / artifact.MANIFEST).write_text(json.dumps({"mixport_version": "0.1.0", "config": 5}))
    artifact.check_target(folder, force=True)  # damaged, but mixport's
    for text in ("{}", "[1]", "not json", '{"mixport_version": 1'):
        (folder / artifact.MANIFEST).write_text(text)
        with pytest.raises(OutputExistsError, match="replaces only a folder mixport wrote"):
            artifact.check_target(folder, force=True)
    with pytest.raises(OutputExistsError, match="already exists"):
        artifact.check_target(folder, force=False)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputExistsError, match="already exists"):
        artifact.check_target(dangling, force=False)
    with pytest.raises(OutputExistsError, match="not a folder"):
        artifact.check_target(dangling, force=True)


def test_a_replaced_folder_comes_back_when_the_rename_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """staging.publish_dir moves the old folder aside, renames the new one in; if that fails, the
    old one is put back where it was and nothing is left beside it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / artifact.MANIFEST).write_text(json.dumps({"mixport_version": "0"}))
    before = snapshot(out)
    real = Path.rename

    def fail_new(self: Path, target: Path) -> Path:
        if self.name.startswith(".out.tmp-") and Path(target) == out:
            raise OSError(28, "No space left on device")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", fail_new)
    with pytest.raises(OSError), artifact.staging_dir(out, force=True) as tmp:
        (tmp / "model.onnx").write_text("new")
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- item 16: the export folder's mode ----------------------------------------------------------

@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o755), (0o077, 0o700), (0o027, 0o750)])
def test_the_staged_folder_gets_the_umask_mode(mask: int, mode: int, tmp_path: Path, umask: None) -> None:
    os.umask(mask)
    with artifact.staging_dir(tmp_path / "out", force=False) as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "out").stat().st_mode & 0o777 == mode


def test_a_setgid_folder_passes_its_group_on_as_with_mkdir(tmp_path: Path, umask: None) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2775)
    os.mkdir(shared / "plain")
    with artifact.staging_dir(shared / "out", force=False):
        pass
    assert (shared / "out").stat().st_mode & 0o7777 == (shared / "plain").stat().st_mode & 0o7777 == 0o2755


def test_an_exported_folder_is_readable_by_others_under_umask_022(src: Path, tmp_path: Path, umask: None) -> None:
    """It was 0700 (mkdtemp's mode) whatever the umask: other users could not read a shared export."""
    res = invoke("export", src, "-o", tmp_path / "out", "--no-check")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "model.onnx").stat().st_mode & 0o777 == 0o644


# ---- optimize: OUT and IN ---------------------------------------------------------------------

def _model_with_external_weights(folder: Path, name: str, location: str) -> Path:
    """FOLDER/NAME: Y = X + W, W stored in FOLDER/LOCATION (external data)."""
    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.arange(1024, dtype=np.float32), "W")
    graph = helper.make_graph([helper.make_node("Add", ["X", "W"], ["Y"])], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1024])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1024])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(folder / name), save_as_external_data=True, location=location,
                    size_threshold=0, all_tensors_to_one_file=True)
    return folder / name


@pytest.mark.parametrize("case", ["same", "same-via-symlink", "its-weights", "its-weights-as-companion"])
def test_optimize_never_writes_over_its_input(case: str, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    if case == "its-weights-as-companion":  # OUT.data (written past 2 GB) would be IN's weights file
        src = _model_with_external_weights(folder, "in.onnx", "fused.onnx.data")
        out = folder / "fused.onnx"
    else:
        src = _model_with_external_weights(folder, "in.onnx", "in.onnx.data")
        out = {"same": src, "its-weights": folder / "in.onnx.data", "same-via-symlink": folder / "link.onnx"}[case]
        if case == "same-via-symlink":
            out.symlink_to(src)
    before = snapshot(tmp_path)
    one_line_error(invoke("optimize", src, "-o", out), "the output would replace an input file")
    assert snapshot(tmp_path) == before


def test_optimize_beside_its_input_still_writes(tmp_path: Path) -> None:
    """The refusal is only for the input's own files: a new name in the same folder is written."""
    src = _model_with_external_weights(tmp_path, "in.onnx", "in.onnx.data")
    before = snapshot(tmp_path)
    res = invoke("optimize", src, "-o", tmp_path / "out.onnx")
    assert res.exit_code == 0, res.output
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == {f"{tmp_path.name}/out.onnx"}
