"""`mixport bench --json` through click's CliRunner (no timings asserted, only their shape)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from mixport.cli import main


def test_bench_json(rt_export: Path) -> None:
    res = CliRunner().invoke(main, ["bench", str(rt_export), "--prompt-len", "8", "--new-tokens", "4",
                                    "--batch", "1", "--batch", "2", "--runs", "1", "--threads", "1", "--json"])
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["graph"] == "fast"
    assert [r["batch"] for r in data["rows"]] == [1, 2]
    for row in data["rows"]:
        assert row["prompt_len"] == 8 and row["new_tokens"] == 4 and row["runs"] == 1
        assert row["prefill_ms"] > 0 and row["decode_tok_s"] > 0


def test_bench_table_and_bad_sizes(rt_export: Path) -> None:
    res = CliRunner().invoke(main, ["bench", str(rt_export), "--prompt-len", "4", "--new-tokens", "3",
                                    "--runs", "1", "--graph", "portable"])
    assert res.exit_code == 0, res.stderr
    assert "graph: portable" in res.stdout and "decode tok/s" in res.stdout
    res = CliRunner().invoke(main, ["bench", str(rt_export), "--prompt-len", "600"])
    assert res.exit_code == 1 and "exceed the model's context" in res.stderr
