"""`mixport bench --json` through click's CliRunner (no timings asserted, only their shape)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mixport.cli import main


def test_bench_json(rt_export: Path) -> None:
    res = CliRunner().invoke(main, ["bench", str(rt_export), "--prompt-len", "8", "--new-tokens", "4",
                                    "--batch", "1", "--batch", "2", "--runs", "1", "--threads", "1", "--json"])
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert (data["backend"], data["graph"]) == ("onnxruntime", "fast")  # what was measured
    assert data["backend_reason"].startswith("TensorRT not used: the folder has no engine")
    assert [r["batch"] for r in data["rows"]] == [1, 2]
    for row in data["rows"]:
        assert row["prompt_len"] == 8 and row["new_tokens"] == 4 and row["runs"] == 1
        assert row["prefill_ms"] > 0 and row["decode_tok_s"] > 0


def test_bench_table_and_bad_sizes(rt_export: Path) -> None:
    res = CliRunner().invoke(main, ["bench", str(rt_export), "--prompt-len", "4", "--new-tokens", "3",
                                    "--runs", "1", "--graph", "portable"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout.startswith("backend: onnxruntime, graph: portable") and "decode tok/s" in res.stdout
    assert "TensorRT not used: the folder has no engine" in res.stdout
    res = CliRunner().invoke(main, ["bench", str(rt_export), "--prompt-len", "600"])
    assert res.exit_code == 1 and "exceed the model's context" in res.stderr


def test_bench_says_tensorrt_was_asked_for_and_refused(rt_export: Path) -> None:
    """--backend as `mixport run` takes it; a folder without an engine cannot be timed with TensorRT."""
    res = CliRunner().invoke(main, ["bench", str(rt_export), "--new-tokens", "2", "--runs", "1",
                                    "--backend", "tensorrt"])
    assert res.exit_code == 1 and "cannot run with TensorRT: the folder has no engine" in res.stderr
    res = CliRunner().invoke(main, ["bench", str(rt_export), "--prompt-len", "4", "--new-tokens", "2", "--runs", "1",
                                    "--threads", "1", "--backend", "onnxruntime", "--graph", "portable", "--json"])
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert (data["backend"], data["graph"], data["backend_reason"]) == (
        "onnxruntime", "portable", "asked for with --backend onnxruntime")


@pytest.mark.gpu
def test_bench_names_tensorrt_when_it_measured_it(engine_export: Path) -> None:
    res = CliRunner().invoke(main, ["bench", str(engine_export), "--prompt-len", "4", "--new-tokens", "2",
                                    "--runs", "1", "--backend", "tensorrt", "--json"])
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert (data["backend"], data["graph"]) == ("tensorrt", "engine")
    assert data["backend_reason"] == "model.engine is up to date for this GPU"
