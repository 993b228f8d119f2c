"""A wrong argument is refused at once (issue 10, item 12): `mixport export` checks its arguments
before torch is imported and before a progress bar is drawn; `mixport run` checks the prompts and
the sampling values before it loads the model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import invoke, one_line_error

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
PROBE = """
import json, sys
from mixport.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "onnx_ir", "tqdm") if m in sys.modules)}))
"""


def _setup(case: str, tiny_dir: Path, tmp: Path) -> list[str]:
    """The arguments of one wrong `export` (files made in TMP as the case needs)."""
    src = tmp / "src"
    shutil.copytree(tiny_dir, src)
    if case == "unknown-model":
        return ["--model", "huge", "-o", str(tmp / "out")]
    if case == "existing-out":
        (tmp / "out").mkdir()
        (tmp / "out" / "x").write_text("x")
        return ["--model", "tiny", "-o", str(tmp / "out")]
    if case == "no-config":
        (src / "config.json").unlink()
    if case == "bad-config":
        (src / "config.json").write_text("{not json")
    if case == "missing-model-dir":
        return [str(tmp / "nope"), "-o", str(tmp / "out")]
    if case == "out-is-src":
        return [str(src), "-o", str(src), "--force"]
    if case == "out-under-a-file":
        (tmp / "notes.txt").write_text("x")
        return [str(src), "-o", str(tmp / "notes.txt" / "out")]
    if case == "force-over-other-data":
        (tmp / "data").mkdir()
        (tmp / "data" / "x").write_text("x")
        return [str(src), "-o", str(tmp / "data"), "--force"]
    return [str(src), "-o", str(tmp / "out")]


@pytest.mark.parametrize(("case", "fragment"), [
    ("unknown-model", "unknown built-in model"), ("existing-out", "already exists"),
    ("no-config", "no config.json"), ("bad-config", "config.json is not valid JSON"),
    ("missing-model-dir", "model folder not found"), ("out-is-src", "the source folder"),
    ("force-over-other-data", "replaces only a folder mixport wrote"),
    ("out-under-a-file", "the output's location is not a folder")])
def test_a_wrong_export_argument_is_refused_before_torch(case: str, fragment: str, tiny_dir: Path,
                                                         tmp_path: Path) -> None:
    """It took ~20 s (torch imported, the model loaded) and drew a progress bar before its line."""
    args = _setup(case, tiny_dir, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", PROBE, "export", *args, "--no-check"], capture_output=True,
                          text=True, env=ENV, cwd=tmp_path, timeout=120)
    seconds = time.monotonic() - started
    report = json.loads(done.stdout.splitlines()[-1])
    assert report == {"code": 1, "heavy": []}, done.stderr  # no torch, no onnx_ir, no progress bar (tqdm)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], done.stderr
    assert seconds < 3, f"{seconds:.1f} s to refuse"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(("args", "fragment"), [
    (["--prompt", ""], "empty prompt"), (["--prompt", "fine", "--prompt", "   "], "empty prompt"),
    (["--prompt", "x", "--temperature", "-1"], "temperature"), (["--prompt", "x", "--top-p", "0"], "top-p")])
def test_run_refuses_a_bad_request_before_loading(args: list[str], fragment: str, export_copy: Path) -> None:
    """An empty prompt was refused only after the model loaded (the backend line came first)."""
    res = invoke("run", export_copy, *args)
    assert res.exit_code in (1, 2), res.output  # 2: a bad option value may be a usage error
    assert "Traceback" not in res.output and fragment in res.output, res.output
    assert "[mixport]" not in res.output, f"the model was loaded first:\n{res.output}"
    if res.exit_code == 1:
        one_line_error(res, fragment)
