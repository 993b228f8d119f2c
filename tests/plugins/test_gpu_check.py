"""tools/gpu_check.{sh,py}: shell syntax, and the CPU smoke mode end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import require_module

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_gpu_check_sh_parses() -> None:
    done = subprocess.run(["bash", "-n", str(ROOT / "tools" / "gpu_check.sh")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu() -> None:
    require_module("triton")
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([str(ROOT / "tools" / "gpu_check.sh"), "--interpret", "--small"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "correctness: all passed" in done.stdout
    assert sum(line.startswith("tiny ") for line in done.stdout.splitlines()) == 2
