"""The benchmark scripts still run end to end (tiny repetition counts; numbers not asserted)."""

from __future__ import annotations

import json
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



@pytest.mark.slow
def test_bench_families_side_by_side(tmp_path: Path) -> None:
    """tools/bench_families.py --tiny: both families exported (peak RSS measured), timed on the graph
    `mixport run` picks and on model.onnx, the ratio Qwen3/Mixtral printed, each row naming its graph."""
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_families.py"), "--tiny", "--rounds", "1",
                          "--prompt-len", "4", "--new-tokens", "3", "--work", str(tmp_path), "--json"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout[res.stdout.index("\n{") + 1:])
    assert list(data["models"]) == ["mini-Mixtral", "mini-Qwen3-MoE"]
    for m in data["models"].values():
        assert m["export_peak_rss_mb"] > 0 and m["export_s"] > 0
        for asked in ("auto", "portable"):
            assert m[asked]["graph"] in ("fast", "portable") and m[asked]["decode_tok_s"] > 0
        assert m["portable"]["graph"] == "portable"
    rows = [ln for ln in res.stdout.splitlines() if "ran: " in ln]
    assert len(rows) == 4 and all(("ran: fast" in r) or ("ran: portable (" in r) for r in rows)
    assert res.stdout.count("Qwen3/Mixtral") == 2
