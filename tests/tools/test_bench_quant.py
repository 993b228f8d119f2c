"""tools/bench_quant.py without its peers: the targets' verdicts, the table, argument handling, the
gate on `mixport export --quantize`, the interleaved rounds; and a tiny end-to-end run of the
mixport fp32 row (slow). llama.cpp and ORT-GenAI are not test dependencies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import bench_quant  # noqa: E402
import quant_common  # noqa: E402
import quant_mixport  # noqa: E402
import quant_table as qt  # noqa: E402


def _rows(**over: dict) -> dict[str, qt.Row]:
    """Every variant measured, mixport just meeting every target; ``over`` replaces fields per row."""
    base = {qt.MIXPORT_FP32: qt.Row(qt.MIXPORT_FP32, decode_tok_s=90, prefill_tok_s=900, size_mb=494, max_err=1e-5),
            qt.MIXPORT_INT8: qt.Row(qt.MIXPORT_INT8, decode_tok_s=260, prefill_tok_s=900, size_mb=140, max_err=0.05),
            qt.MIXPORT_INT4: qt.Row(qt.MIXPORT_INT4, decode_tok_s=330, prefill_tok_s=900, size_mb=90, max_err=0.3),
            qt.LLAMA_F32: qt.Row(qt.LLAMA_F32, decode_tok_s=90, prefill_tok_s=1000, size_mb=494, max_err=1e-4),
            qt.LLAMA_Q8: qt.Row(qt.LLAMA_Q8, decode_tok_s=255, prefill_tok_s=1000, size_mb=131, max_err=0.053),
            qt.LLAMA_Q4: qt.Row(qt.LLAMA_Q4, decode_tok_s=320, prefill_tok_s=1000, size_mb=70, max_err=0.6),
            qt.ORTGENAI_INT4: qt.Row(qt.ORTGENAI_INT4, decode_tok_s=280, prefill_tok_s=800, size_mb=134, max_err=0.64)}
    for name, fields in over.items():
        for key, value in fields.items():
            setattr(base[name], key, value)
    return base


def _status(rows: dict[str, qt.Row]) -> dict[str, str]:
    return {v.label: v.status for v in qt.judge_all(rows)}


def test_every_target_met_at_the_bounds() -> None:
    assert set(_status(_rows()).values()) == {"met"}


@pytest.mark.parametrize(("name", "field", "value", "label"), [
    (qt.MIXPORT_INT8, "decode_tok_s", 254.0, "int8 decode >= llama.cpp q8_0"),
    (qt.MIXPORT_INT8, "max_err", 0.054, "int8 max logit error <= q8_0's"),
    (qt.MIXPORT_INT4, "decode_tok_s", 319.0, "int4 decode >= llama.cpp q4_0"),
    (qt.MIXPORT_INT4, "max_err", 0.33, "int4 max logit error <= 0.5x ORT-GenAI's"),  # 0.33 > 0.64 / 2
    (qt.ORTGENAI_INT4, "decode_tok_s", 301.0, "int4 decode >= 1.1x ORT-GenAI int4"),  # 330 / 301 < 1.1
    (qt.MIXPORT_INT4, "size_mb", 150.5, "int4 export folder < 150 MB"),
])
def test_one_miss_fails_exactly_its_target(name: str, field: str, value: float, label: str) -> None:
    got = _status(_rows(**{name: {field: value}}))
    assert got.pop(label) == "not met"
    assert set(got.values()) == {"met"}


def test_a_loaded_machine_makes_speed_verdicts_unsure() -> None:
    verdicts = qt.judge_all(_rows(**{qt.MIXPORT_INT8: {"max_err": 1.0}}), loaded=True)
    speed = [v for t, v in zip(qt.TARGETS, verdicts, strict=True) if t.metric == "decode_tok_s"]
    assert len(speed) == 3 and {v.status for v in speed} == {"unsure"}
    assert all(v.detail.endswith("met on a loaded machine: rerun quiet") for v in speed)
    others = {v.label: v.status for v in verdicts if v not in speed}
    assert others.pop("int8 max logit error <= q8_0's") == "not met" and set(others.values()) == {"met"}
    assert "[unsure ]" in qt.format_report(_rows(), "H", loaded=True)


def test_load_flags_the_run() -> None:
    args = bench_quant.parse_args([])
    plan = quant_common.Plan(vocab=100, threads=2)
    quiet, loaded = bench_quant.run_header(args, Path("src"), plan, 0.2, 2.4)  # the end counts our own 2 threads
    assert not loaded and "(load avg 0.2 -> 2.4)" in quiet and "WARNING" not in quiet
    for start, end in ((0.9, 1.0), (0.1, 3.0)):
        text, loaded = bench_quant.run_header(args, Path("src"), plan, start, end)
        assert loaded and "\nWARNING: other jobs shared these cores" in text


def test_a_peer_that_did_not_run_makes_its_targets_na_with_the_reason() -> None:
    rows = _rows(**{qt.LLAMA_Q4: {"why": "llama-cpp-python is not installed"}})
    verdicts = {v.label: v for v in qt.judge_all(rows)}
    for label in ("int4 decode >= llama.cpp q4_0", "int4 max logit error <= q4_0's"):
        assert verdicts[label].status == "n/a" and qt.LLAMA_Q4 in verdicts[label].detail
    assert [v.status for v in verdicts.values()].count("n/a") == 2
    rows[qt.MIXPORT_INT8].decode_tok_s = None  # measured, not timed (the portable graph)
    assert qt.judge(qt.TARGETS[0], rows).detail == f"{qt.MIXPORT_INT8} has no decode tok s (see its row)"
    assert qt.judge(qt.TARGETS[1], rows).status == "met"
    del rows[qt.ORTGENAI_INT4]  # not asked for at all
    assert qt.judge(qt.TARGETS[4], rows).detail == f"{qt.ORTGENAI_INT4} not run"


def test_report_shows_rows_ratios_and_targets() -> None:
    rows = _rows(**{qt.MIXPORT_INT8: {"why": quant_mixport.NO_QUANTIZE}})
    rows[qt.MIXPORT_INT4].notes.append("ran: fast graph")
    text = qt.format_report(rows, "HEADER")
    lines = text.splitlines()
    assert lines[0] == "HEADER"
    assert f"  {qt.MIXPORT_INT8:<16} not run: {quant_mixport.NO_QUANTIZE}" in lines
    assert "mixport int4 / llama.cpp q4_0 decode: 1.03x" in text  # 330 / 320
    assert "mixport int4 / ORT-GenAI int4 decode: 1.18x" in text
    assert "mixport int8 / llama.cpp q8_0 decode: n/a (mixport int8 not run (see its row))" in text
    assert "(ran: fast graph)" in text and "ORT-GenAI int4 0.6400" in text
    assert sum(ln.startswith("  [") for ln in lines) == len(qt.TARGETS)
    row = next(ln for ln in lines if ln.lstrip().startswith(qt.LLAMA_Q8))
    assert row.split()[2:5] == ["255.0", "1000", "131.0"]
    rows[qt.LLAMA_Q8].decode_tok_s = rows[qt.LLAMA_Q8].prefill_tok_s = None  # not timed: columns stay aligned
    untimed = next(ln for ln in qt.format_rows(rows) if ln.lstrip().startswith(qt.LLAMA_Q8))
    assert len(untimed) == len(row) and untimed.split()[2:5] == ["-", "-", "131.0"]


def test_logit_errors() -> None:
    ref = np.array([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    got = ref + np.array([[0.0, 0.0, -0.5], [0.0, 4.0, 0.0]])  # second row's argmax moves
    got = quant_common.logit_errors(ref, got)
    assert got["max_err"] == 4.0 and got["p50_err"] == 2.25 and got["top1"] == 0.5
    assert got["rms_err"] == pytest.approx(np.sqrt((0.25 + 16) / 6))
    row = qt.Row("x")
    row.set_errors(got)
    assert (row.max_err, row.p50_err) == (4.0, 2.25)


def test_interleaved_alternates_and_takes_medians() -> None:
    calls: list[str] = []

    def timer(name: str, times: list[tuple[float, float]]):  # noqa: ANN202
        it = iter(times)
        return lambda: (calls.append(name), next(it))[1]

    got = quant_common.interleaved({"a": timer("a", [(1, 10), (3, 30), (2, 20)]),
                                    "b": timer("b", [(5, 5), (5, 5), (9, 1)])}, rounds=3)
    assert calls == ["a", "b"] * 3
    assert got == {"a": {"prefill_s": 2, "decode_s": 20}, "b": {"prefill_s": 5, "decode_s": 5}}
    plan = quant_common.Plan(vocab=100, prompt_len=64, new_tokens=128)
    assert quant_common.speeds(got["a"], plan) == {"prefill_tok_s": 32.0, "decode_tok_s": 127 / 20}


def test_arguments() -> None:
    assert bench_quant.variant_list("llama-q4_0, mixport-int4") == ["mixport-int4", "llama-q4_0"]  # table order
    assert bench_quant.variant_list("all") == list(bench_quant.VARIANTS)
    args = bench_quant.parse_args(["--variants", "mixport-fp32", "--block-size", "64"])
    assert args.variants == ["mixport-fp32"] and args.block_size == 64 and args.new_tokens == 128
    args = bench_quant.parse_args(["--block-size", "64", "--zero-points", "--quantize-lm-head"])
    assert bench_quant.export_flags(args, None) == []
    assert bench_quant.export_flags(args, "int8") == ["--block-size", "64", "--quantize-lm-head"]
    assert bench_quant.export_flags(args, "int4") == ["--block-size", "64", "--zero-points", "--quantize-lm-head"]
    for bad in (["--variants", "llama-q5"], ["--new-tokens", "1"], ["--rounds", "0"], ["--block-size", "0"],
                ["--ortgenai-option", "accuracy_level"]):
        with pytest.raises(SystemExit) as exc:
            bench_quant.parse_args(bad)
        assert exc.value.code == 2


def test_export_without_quantize_option_says_it_has_not_landed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CLI that rejects --quantize (exit 2, click's message) is the not-landed case; another
    failure is reported with its exit code and log tail."""
    cli = "import sys; print(\"Error: No such option: --quantize\"); sys.exit(2)"
    monkeypatch.setattr(quant_mixport, "CLI", [sys.executable, "-c", cli])
    assert quant_mixport.export(tmp_path, tmp_path / "int8", "int8", []) == (quant_mixport.NO_QUANTIZE, None)
    monkeypatch.setattr(quant_mixport, "CLI", [sys.executable, "-c", "import sys; print('boom'); sys.exit(1)"])
    why, peak = quant_mixport.export(tmp_path, tmp_path / "fp32", None, [])
    assert why == "mixport export exited 1: boom" and peak is None
    (tmp_path / "int4").mkdir()
    (tmp_path / "int4" / "manifest.json").write_text("{}")
    assert quant_mixport.export(tmp_path, tmp_path / "int4", "int4", ["--zero-points"]) == ("", None)  # reused


def test_run_cli_reports_the_childs_own_peak_rss(tmp_path: Path) -> None:
    """The peak RSS is the child's VmHWM, not this (larger) process's memory at fork time."""
    ballast = bytearray(400 * 2**20)  # this process: +400 MB resident
    ballast[::4096] = b"x" * len(ballast[::4096])
    code, peak = quant_mixport.run_cli(["--help"], tmp_path / "help.log")
    assert code == 0 and "Usage" in (tmp_path / "help.log").read_text()
    assert peak is not None and 5 < peak < 400
    del ballast


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path: Path) -> None:
    """--tiny with the mixport fp32 and int8 rows: exported, opened as `mixport run` opens them, timed,
    fp32 ~0 error vs transformers, int8 smaller with a larger (nonzero) error, run RSS measured, the
    targets printed (n/a: no peer asked for)."""
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_quant.py"), "--tiny", "--rounds", "1",
                          "--prompt-len", "4", "--new-tokens", "3", "--error-len", "6", "--work", str(tmp_path),
                          "--variants", "mixport-fp32,mixport-int8", "--json"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout[res.stdout.index("\n{") + 1:])
    fp32 = data["rows"][qt.MIXPORT_FP32]
    assert fp32["why"] == "" and fp32["decode_tok_s"] > 0 and fp32["peak_rss_mb"] > 0
    assert fp32["max_err"] < 1e-3 and fp32["top1"] == 1.0
    assert any(n.startswith("ran: fast graph") for n in fp32["notes"])
    int8 = data["rows"][qt.MIXPORT_INT8]
    assert int8["why"] == "" and int8["size_mb"] < fp32["size_mb"]
    if any(n.startswith("ran: fast graph") for n in int8["notes"]):
        assert int8["decode_tok_s"] > 0
    else:  # the portable model.onnx is measured (errors, size, RSS) but not timed without --time-portable
        assert int8["decode_tok_s"] is None and any(n.startswith("not timed: portable graph") for n in int8["notes"])
    assert fp32["max_err"] < int8["max_err"] < 1.0 and int8["peak_rss_mb"] > 0
    assert {v["status"] for v in data["targets"][:-1]} == {"n/a"}
    assert len(data["targets"]) == len(qt.TARGETS) and "issue 12 targets:" in res.stdout
