"""`pip install 'mixport[trt]'` needs no manual step: the parser link is made before parsing.

A copy of the ``tensorrt_rtx_libs`` package without ``libtensorrt_rtx.so`` (its
libraries linked, not copied) is put first on PYTHONPATH of a child process,
which builds a plugin model. Without mixport's link the parser aborts the child
(the control); with it the build succeeds and the link appears in the copy.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import mixport
from mixport.engine.symlink import LINK_NAME, ParserSymlinkError, ensure_parser_symlink, rtx_libs_dir

CHILD = """
import sys
from pathlib import Path
import mixport.engine.builder as engine
from mixport.engine.profiles import ProfileSpec
from mixport.plugins.testing import write_tiny_moe_model
if sys.argv[1] == "without-link":
    engine.ensure_parser_symlink = lambda *args: None
out = Path(sys.argv[2])
model = write_tiny_moe_model(out / "tiny.onnx", hidden=32, ffn=48, experts=4, k=2)
result = engine.build_engine(model, out / "tiny.engine", profiles=ProfileSpec(dims={"T": (1, 8, 64)}))
print("plugin layers:", len(result.plugin_layers))
"""


@pytest.fixture
def libs_without_link(rtx_module: ModuleType, tmp_path: Path) -> Path:
    """Only the TensorRT-RTX wheel needs the parser link: RTX is used even where full TensorRT is installed."""
    real = rtx_libs_dir()
    assert real is not None, f"TensorRT-RTX imports ({rtx_module.__file__}) but its libs folder is not found"
    copy = tmp_path / "site" / "tensorrt_rtx_libs"
    copy.mkdir(parents=True)
    for item in real.iterdir():
        if item.name.endswith(".py"):
            shutil.copy2(item, copy / item.name)
        elif item.name.startswith("lib") and item.name != LINK_NAME:
            (copy / item.name).symlink_to(item.resolve())
    return copy


def _child(mode: str, libs: Path, out: Path) -> subprocess.CompletedProcess:
    out.mkdir()
    source_root = str(Path(mixport.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(libs.parent), source_root])}
    return subprocess.run([sys.executable, "-c", CHILD, mode, str(out)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_missing_link_is_created_before_parsing(libs_without_link: Path, tmp_path: Path) -> None:
    control = _child("without-link", libs_without_link, tmp_path / "a")
    assert control.returncode != 0 and "terminate called" in control.stderr, control.stderr[-2000:]
    assert not (libs_without_link / LINK_NAME).exists()
    run = _child("with-link", libs_without_link, tmp_path / "b")
    assert run.returncode == 0 and "plugin layers: 2" in run.stdout, run.stderr[-2000:]
    assert os.readlink(libs_without_link / LINK_NAME) == f"{LINK_NAME}.1"


def test_unwritable_folder_gives_the_exact_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / f"{LINK_NAME}.1").write_bytes(b"")
    if os.geteuid() != 0:
        tmp_path.chmod(0o555)
    else:  # root writes anywhere: make the link call fail the way a read-only folder does
        def refuse(_src: str, _dst: str) -> None:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(os, "symlink", refuse)
    try:
        with pytest.raises(ParserSymlinkError) as info:
            ensure_parser_symlink(tmp_path)
    finally:
        tmp_path.chmod(0o755)
    command = f"ln -s {tmp_path / (LINK_NAME + '.1')} {tmp_path / LINK_NAME}"
    assert re.search(f"hint: run once: {re.escape(command)}$", str(info.value)), str(info.value)
    assert "Permission denied" in str(info.value)
