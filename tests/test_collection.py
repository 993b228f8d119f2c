"""Every test folder is collected (issue 9: pytest skipped `tests/build/` for its name, 35 tests never ran).

pytest's default ``norecursedirs`` leaves out any folder named ``build`` (and
``dist``, ``.*``, ``*.egg``...) without a word. The guard: collect the suite in a
child process and fail when a top-level folder of ``tests/`` that holds
``test_*.py`` files yields zero tests, or when a folder named ``build`` exists
under ``mixport/`` or ``tests/`` at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = "."  # the key for test files directly in tests/


def collected_per_folder(collect_output: str, tests_dir: str = "tests") -> Counter:
    """Collected test ids per top-level folder of ``tests_dir``, from ``pytest --collect-only -q`` output."""
    counts: Counter = Counter()
    for line in collect_output.splitlines():
        path = line.split("::", 1)[0]
        if "::" not in line or not path.startswith(f"{tests_dir}/"):
            continue
        parts = path.split("/")
        counts[parts[1] if len(parts) > 2 else TOP] += 1
    return counts


def folders_with_tests(tests_root: Path) -> set[str]:
    """Top-level folders of ``tests_root`` (and TOP for tests_root itself) holding test_*.py files."""
    found = {TOP} if any(tests_root.glob("test_*.py")) else set()
    found |= {d.name for d in tests_root.iterdir() if d.is_dir() and any(d.rglob("test_*.py"))}
    return found


def uncollected_folders(collect_output: str, tests_root: Path) -> list[str]:
    """Folders that hold test files yet yielded no collected test."""
    counts = collected_per_folder(collect_output, tests_root.name)
    return sorted(name for name in folders_with_tests(tests_root) if counts[name] == 0)


def build_folders(root: Path) -> list[Path]:
    """Folders named ``build`` under ``root/mixport`` and ``root/tests``."""
    return sorted(p for top in ("mixport", "tests") if (root / top).is_dir()
                  for p in (root / top).rglob("build") if p.is_dir())


def collect(root: Path) -> subprocess.CompletedProcess:
    """``python -m pytest --collect-only -q tests`` in ``root``, with this environment."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests"], cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_every_test_folder_is_collected() -> None:
    done = collect(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    counts = collected_per_folder(done.stdout)
    assert uncollected_folders(done.stdout, ROOT / "tests") == [], counts
    assert sum(counts.values()) > 0 and f"{sum(counts.values())} tests collected" in done.stdout, counts


def test_no_folder_is_named_build() -> None:
    assert build_folders(ROOT) == []


def test_counting_on_a_collect_output() -> None:
    output = ("tests/engine/test_a.py::test_x\ntests/engine/sub/test_b.py::test_y[1-2]\n"
              "tests/test_cli.py::test_z\n\n3 tests collected in 0.10s\n")
    assert collected_per_folder(output) == Counter({"engine": 2, TOP: 1})


def test_the_guard_catches_the_old_layout(tmp_path: Path) -> None:
    """A real pytest session over tests/build/ (ignored by pytest) and tests/engine/: the guard names build."""
    for folder in ("build", "engine"):
        (tmp_path / "tests" / folder).mkdir(parents=True)
        (tmp_path / "tests" / folder / "test_x.py").write_text("def test_x():\n    pass\n")
    (tmp_path / "mixport" / "build").mkdir(parents=True)
    done = collect(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert collected_per_folder(done.stdout) == Counter({"engine": 1})
    assert uncollected_folders(done.stdout, tmp_path / "tests") == ["build"]
    assert build_folders(tmp_path) == [tmp_path / "mixport" / "build", tmp_path / "tests" / "build"]
