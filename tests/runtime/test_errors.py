"""Unusable requests and folders: one clear line on stderr, exit 1; Ctrl-C: exit 130."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import mixport
from mixport.cli import main


def run_cli(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.stdout, res.stderr


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 1, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


def test_prompt_longer_than_context(rt_export: Path) -> None:
    code, out, err = run_cli("run", str(rt_export), "--prompt", "x " * 600, "--max-new-tokens", "4")
    assert_one_line_error(code, err, "longer than the model's context")
    assert out == ""  # nothing printed before the request was refused


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(rt_export: Path, prompt: str) -> None:
    code, _, err = run_cli("run", str(rt_export), "--prompt", prompt)
    assert_one_line_error(code, err, "empty prompt")


def test_non_utf8_prompts_file(rt_export: Path, tmp_path: Path) -> None:
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"The ship\n\xff\xfe sailed\n")
    code, _, err = run_cli("run", str(rt_export), "--prompts-file", str(bad))
    assert_one_line_error(code, err, "not UTF-8")


def test_prompts_file_runs_a_batch(rt_export: Path, tmp_path: Path) -> None:
    good = tmp_path / "prompts.txt"
    good.write_text("The ship\n\nA router\n", encoding="utf-8")
    code, out, err = run_cli("run", str(rt_export), "--prompts-file", str(good), "--max-new-tokens", "4")
    assert code == 0, err
    assert out.startswith("[0] The ship") and "\n[1] A router" in out


def test_model_changed_after_export(rt_copy: Path) -> None:
    with (rt_copy / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    code, _, err = run_cli("run", str(rt_copy), "--prompt", "The ship")
    assert_one_line_error(code, err, "does not match the manifest")


def test_folder_from_a_newer_mixport(rt_copy: Path) -> None:
    manifest = json.loads((rt_copy / "manifest.json").read_text())
    manifest["mixport_version"] = "99.0.0"
    (rt_copy / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli("run", str(rt_copy), "--prompt", "The ship")
    assert_one_line_error(code, err, "newer mixport")


def test_ctrl_c_while_streaming_keeps_the_text_and_exits_130(rt_export: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(mixport.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "mixport.cli", "run", str(rt_export), "--prompt", "The ship",
                             "--max-new-tokens", "480", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.read(8)  # the prompt is echoed (and flushed) when streaming starts
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert (first + rest).decode().startswith("The ship")
    assert b"Traceback" not in err and b"interrupted" in err


def test_no_prompt_is_a_usage_error(rt_export: Path) -> None:
    code, _, err = run_cli("run", str(rt_export))
    assert code == 2 and "--prompt" in err


def test_ctrl_c_in_a_batch_prints_the_rows_so_far(rt_export: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(mixport.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "mixport.cli", "run", str(rt_export), "--prompt", "The ship",
                             "--prompt", "A router", "--max-new-tokens", "480", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    for line in proc.stderr:  # the backend line comes right before generation starts
        if b"backend:" in line:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert out.decode().startswith("[0] The ship") and "\n[1] A router" in out.decode()
    assert b"Traceback" not in err


def test_auto_uses_the_portable_graph_where_the_fast_one_cannot_run(rt_copy: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from mixport.errors import RuntimeFailure
    from mixport.models import registry
    from mixport.runtime import load
    from mixport.runtime.ort_session import OrtSession

    monkeypatch.setattr(registry.get("mixtral"), "fast_graph", False)  # a family the fast graph has not learned
    assert isinstance(load(rt_copy, threads=1).session, OrtSession)
    with pytest.raises(RuntimeFailure, match="cannot express this model"):
        load(rt_copy, threads=1, graph="fast")
