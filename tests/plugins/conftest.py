"""Plugin tests: markers, and the Triton interpreter scoped to the CPU kernel tests.

Tests marked ``triton_interpret`` run the Triton kernels on CPU tensors in
triton's interpreter (``TRITON_INTERPRET=1``). The interpreter is NOT switched
on for the test process: the ``gpu`` tests run in that process and must launch
compiled kernels. Triton reads ``TRITON_INTERPRET`` whenever a kernel is
wrapped (``triton.jit``, mixport's ``Kernel.wrapped``, through
``triton.knobs.runtime.interpret``), and older triton releases (3.9 does
not) let an interpreted launch patch ``triton.language`` for the rest of the
process, so the two modes are not mixed in one process. Instead the marked tests run in ONE child
pytest session started with ``TRITON_INTERPRET=1`` (only the marked tests the
parent selected), and each parent item reports its own child outcome: passed,
failed (with the child's failure text) or skipped (a failure under CI=true).
A process that already runs interpreted (the child, or a user's
``TRITON_INTERPRET=1 pytest``) runs the marked tests in place.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

USER_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET")  # as the user started pytest; never changed here
INTERPRET = "triton_interpret"
RESULTS_ENV = "MIXPORT_INTERPRETED_RESULTS"  # set in the child: where it writes one JSON line per report
_RESULTS = pytest.StashKey[dict[str, list[dict[str, str]]]]()
_CHILD_OUTPUT = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 cores")
    config.addinivalue_line("markers", f"{INTERPRET}: runs in a child pytest session with TRITON_INTERPRET=1")


def interpreted_here() -> bool:
    """Whether this process launches Triton kernels in the interpreter (as triton itself decides)."""
    from mixport.plugins.kernels._runtime import interpret_mode

    return interpret_mode()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """In the child session: record every phase's outcome for the parent."""
    path = os.environ.get(RESULTS_ENV)
    if not path:
        return
    text = report.longreprtext if report.failed else ""
    if report.skipped and isinstance(report.longrepr, tuple):
        text = str(report.longrepr[2])
    with open(path, "a", encoding="utf-8") as sink:
        sink.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                               "text": text}) + "\n")


def _run_child(session: pytest.Session) -> dict[str, list[dict[str, str]]]:
    """One child session with TRITON_INTERPRET=1 over every selected ``triton_interpret`` test."""
    config = session.config
    nodeids = [item.nodeid for item in session.items if item.get_closest_marker(INTERPRET)]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(config.rootpath), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *nodeids]
    by_node: dict[str, list[dict[str, str]]] = {}
    with tempfile.TemporaryDirectory(prefix="mixport-interpreted-") as tmp:
        results = Path(tmp) / "results.jsonl"
        done = subprocess.run(cmd, cwd=config.rootpath, env={**env, RESULTS_ENV: str(results)},
                              capture_output=True, text=True, timeout=3600, check=False)
        config.stash[_CHILD_OUTPUT] = (done.stdout + done.stderr)[-4000:]
        lines = results.read_text(encoding="utf-8").splitlines() if results.exists() else []
    for line in lines:
        record = json.loads(line)
        by_node.setdefault(record["nodeid"], []).append(record)
    return by_node


def _replay(item: pytest.Item, records: list[dict[str, str]]) -> None:
    """Pass, fail or skip ``item`` as its child run did."""
    failed = [r for r in records if r["outcome"] == "failed"]
    if failed:
        pytest.fail("\n".join(f"[interpreted child, {r['when']}] {r['text']}" for r in failed), pytrace=False)
    skipped = [r for r in records if r["outcome"] == "skipped"]
    if skipped:
        pytest.skip(f"[interpreted child] {skipped[0]['text']}")
    if not any(r["when"] == "call" and r["outcome"] == "passed" for r in records):
        pytest.fail(f"the interpreted child session did not run {item.nodeid}; its output ends:\n"
                    f"{item.config.stash.get(_CHILD_OUTPUT, '')}", pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Any:
    """A ``triton_interpret`` test in a compiled-mode process: report its outcome from the child session."""
    if pyfuncitem.get_closest_marker(INTERPRET) is None or interpreted_here():
        return None
    config = pyfuncitem.config
    if _RESULTS not in config.stash:
        config.stash[_RESULTS] = _run_child(pyfuncitem.session)
    _replay(pyfuncitem, config.stash[_RESULTS].get(pyfuncitem.nodeid, []))
    return True
