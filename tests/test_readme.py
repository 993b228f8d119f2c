"""The README's first two commands: the main job runs, and .ci/run runs the test command; its
Supported architectures table lists every family mixport registers."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_ci_runs_the_readme_test_command() -> None:
    _, test_cmd = readme_commands()
    assert "pytest" in test_cmd
    script = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in script
    lines = script.splitlines()
    assert "export CI=true" in lines[: next(i for i, ln in enumerate(lines) if test_cmd in ln)], script


def test_readme_main_job_runs(tmp_path: Path) -> None:
    """The mixport steps of the first command, in a fresh folder, with this environment's mixport."""
    main_cmd, _ = readme_commands()
    steps = [s.strip() for s in main_cmd.split("&&") if s.strip().startswith("mixport ")]
    assert [s.split()[1] for s in steps] == ["export", "run"]
    exe = shutil.which("mixport") or ""
    prefix = [exe] if exe else [sys.executable, "-m", "mixport.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    outputs = []
    for step in steps:
        res = subprocess.run(prefix + shlex.split(step)[1:], cwd=tmp_path, capture_output=True, text=True,
                             env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        outputs.append(res.stdout)
    assert "parity: PASSED" in outputs[0]
    assert outputs[1].startswith("The ship sailed") and len(outputs[1]) > len("The ship sailed")


def test_readme_lists_every_registered_architecture() -> None:
    """One row per adapter in the Supported architectures table: its architectures and model_type."""
    from mixport.models import registry

    text = (ROOT / "README.md").read_text()
    section = text.split("## Supported architectures", 1)[1].split("\n## ", 1)[0]
    table = section.split("| --- |", 1)[1].split("\n", 1)[1]  # the rows below the header
    rows = [ln for ln in table.splitlines() if ln.startswith("| `")]
    listed = [tuple(cell.strip().strip("`") for cell in row.split("|")[1:3]) for row in rows]
    assert listed == [(a.architectures[0], a.model_type) for a in registry.ADAPTERS]
