"""tools/bench_serve.py --tiny runs end to end against a real `mixport serve` on 127.0.0.1 (numbers
not asserted, only that every phase ran, nothing failed or got lost, and the server exited 0)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_serve_tiny(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_serve.py"), "--tiny", "--clients", "1,8",
                          "--memory-run", "16", "--work", str(tmp_path), "--time-limit", "300", "--json"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(res.stdout.strip().splitlines()[-1])
    assert [r["clients"] for r in data["rows"]] == [1, 8]
    for row in data["rows"]:
        assert row["requests"] == 2 * row["clients"] and row["errors"] == 0 and row["lost"] == 0, row
        assert 0 < row["tokens"] <= 8 * row["requests"] and row["agg_tok_s"] > 0 and row["ttft_p99_ms"] > 0, row
    assert data["verdict"]["ratio_8_over_1"] > 0 and data["server_exit"] == 0
    memory = data["memory"]
    assert memory["requests"] == 16 and memory["errors"] == 0 and memory["end_mb"] > 0
    assert "aggregate decode at 8 clients / 1 client" in res.stdout and "| 8 | 16 |" in res.stdout
