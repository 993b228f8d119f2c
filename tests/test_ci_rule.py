"""The CI rule of tests/conftest.py: under CI=true a skip fails, except for `gpu` tests.

A small pytest session in a child process, with this suite's hooks, runs a test
that needs a missing module, a module skipped at import, a plain skip, an
xfail and two `gpu` tests; once with CI=true and once without.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING = "mixport_no_such_module_for_tests"

CONFTEST = """
from tests.conftest import (  # noqa: F401 - this suite's hooks
    pytest_collection_modifyitems,
    pytest_make_collect_report,
    pytest_runtest_makereport,
)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU")
"""

FILES = {
    "test_missing.py": f"""
from tests.helpers import require_module


def test_needs_a_missing_module():
    require_module("{MISSING}")


def test_passes():
    pass
""",
    "test_module_skip.py": f"""
import pytest

pytest.importorskip("{MISSING}")


def test_never_collected():
    pass
""",
    "test_other.py": """
import pytest


def test_plain_skip():
    pytest.skip("not today")


@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False


@pytest.mark.gpu
def test_gpu_marked():
    import torch
    if not torch.cuda.is_available():
        pytest.skip("no GPU")


@pytest.mark.gpu
@pytest.mark.skipif(True, reason="needs a GPU")
def test_gpu_marked_skipif():
    pass
""",
}


def outcomes(tmp_path: Path, ci: bool) -> dict[str, str]:
    """{test or module name: passed | failed | skipped | error} of the small session."""
    for name, text in {"conftest.py": CONFTEST, **FILES}.items():
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if ci:
        env["CI"] = "true"
    junit = tmp_path / f"junit-{ci}.xml"
    # A collection error stops a session before any test runs; here the session goes on, to see every outcome.
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                    "--continue-on-collection-errors", str(tmp_path)],
                   cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    found = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        found[case.get("name")] = {"failure": "failed"}.get(kinds[0], kinds[0]) if kinds else "passed"
    return found


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, dict[str, str]]:
    return {ci: outcomes(tmp_path_factory.mktemp(f"ci-{ci}"), ci) for ci in (True, False)}


def test_in_ci_a_missing_dependency_fails(both: dict[bool, dict[str, str]]) -> None:
    assert both[True] == {
        "test_needs_a_missing_module": "failed", "test_passes": "passed", "test_module_skip": "error",
        "test_plain_skip": "failed", "test_expected_failure": "skipped",  # xfail reads as skipped in JUnit
        "test_gpu_marked": "skipped", "test_gpu_marked_skipif": "skipped",
    }


def test_locally_it_skips(both: dict[bool, dict[str, str]]) -> None:
    assert both[False] == {
        "test_needs_a_missing_module": "skipped", "test_passes": "passed", "test_module_skip": "skipped",
        "test_plain_skip": "skipped", "test_expected_failure": "skipped",
        "test_gpu_marked": "skipped", "test_gpu_marked_skipif": "skipped",
    }
