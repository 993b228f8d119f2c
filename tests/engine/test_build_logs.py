"""`mixport build` keeps TensorRT's chatter out of the output unless -v (then on stderr).

TensorRT's ONNX parser warns "Make sure input input_ids has Int64 binding." once per int64
input through its ILogger; Python's last-resort handler used to print those warnings. The build
runs in a child process so that anything written straight to file descriptors 1 and 2 (by the
C++ libraries too) is seen.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import mixport

CHATTER = "Make sure input"


def _build(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(mixport.__file__).parents[1])}
    return subprocess.run([sys.executable, "-m", "mixport.cli", "build", str(folder), *args],
                          capture_output=True, text=True, env=env, timeout=600, check=False)


def test_build_prints_no_tensorrt_chatter_without_verbose(tiny_export: Path, tmp_path: Path,
                                                          trt_module: ModuleType) -> None:
    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    quiet = _build(folder)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.startswith("built ") and len(quiet.stdout.splitlines()) == 1, quiet.stdout
    assert CHATTER not in quiet.stdout + quiet.stderr, quiet.stderr
    assert [ln for ln in quiet.stderr.splitlines() if not ln.startswith("[mixport] ")] == [], quiet.stderr

    verbose = _build(folder, "--force", "-v")
    assert verbose.returncode == 0, verbose.stderr
    assert CHATTER not in verbose.stdout, verbose.stdout
    shown = [ln for ln in verbose.stderr.splitlines() if CHATTER in ln]
    assert len(shown) == 3 and all(ln.startswith("[mixport.engine] warning: ") for ln in shown), verbose.stderr
