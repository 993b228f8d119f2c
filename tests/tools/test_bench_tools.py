"""The benchmark scripts still run end to end (tiny repetition counts; numbers not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_moe_layer_table() -> None:
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_moe.py"), "--skip-e2e", "--reps", "4"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "fused/dense" in res.stdout and "fused/ms.MoE" in res.stdout
    rows = [ln.split() for ln in res.stdout.splitlines() if ln.strip().split(" ")[0] in ("1", "16", "256")]
    assert [r[:2] for r in rows] == [[t, mode] for t in ("1", "16", "256") for mode in ("steady", "cold", "flushed")]

