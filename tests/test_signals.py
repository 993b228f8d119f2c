"""Signals (issue 10, item 10): Ctrl-C exits 130 and SIGTERM 143, each with one line and after the
export's cleanup ran (no OUT, no staging folder); a staging folder left by an export killed with
SIGKILL is removed by the next export to the same OUT, which says so; a live process's never is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mixport import artifact, staging
from tests.helpers import invoke

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _hidden(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith("."))


def _default_sigint() -> None:
    """In the child: Ctrl-C as a terminal delivers it, even when this suite runs as a background job
    (whose shell ignores SIGINT, which children inherit and mixport rightly keeps)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_export(out: Path, log: Path) -> subprocess.Popen:
    """`mixport export --model tiny -o OUT` in a child process (stderr to LOG)."""
    with log.open("w") as err:
        return subprocess.Popen([sys.executable, "-m", "mixport.cli", "export", "--model", "tiny", "-o", str(out),
                                 "--no-check"], stdout=subprocess.DEVNULL, stderr=err, env=ENV, cwd=out.parent,
                                preexec_fn=_default_sigint)


def _staged(proc: subprocess.Popen, out: Path, log: Path, timeout: float = 300) -> Path:
    """The child's staging folder beside OUT, once it exists (the export is under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
        if found:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"the export ended (rc {proc.returncode}) before staging anything:\n{log.read_text()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no staging folder after {timeout} s:\n{log.read_text()}")


@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                    (signal.SIGTERM, 143, "terminated")])
def test_a_signal_mid_export_cleans_up_and_exits(sig: signal.Signals, code: int, word: str, tmp_path: Path) -> None:
    """Ctrl-C printed click's "Aborted!" and exited 1; SIGTERM left the staging folder behind."""
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    proc = _start_export(out, log)
    try:
        staged = _staged(proc, out, log)
        assert f".out.tmp-{proc.pid}-" in staged.name  # the staging folder names its process
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    err = log.read_text()
    assert rc == code, err
    assert "Traceback" not in err and "Aborted" not in err, err
    lines = [ln for ln in err.splitlines() if word in ln]
    assert lines == [f"[mixport] {word}"], err
    assert err.rstrip().endswith(f"[mixport] {word}"), err
    assert list(tmp_path.iterdir()) == [log], "OUT or a staging folder was left behind"


def test_the_next_export_removes_a_killed_exports_staging_folder(tmp_path: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    proc = _start_export(out, log)
    try:
        staged = _staged(proc, out, log)
    finally:
        proc.kill()  # SIGKILL: no cleanup can run
        proc.wait()
    assert staged.is_dir() and not out.exists()
    res = invoke("export", "--model", "tiny", "-o", out, "--no-check")
    assert res.exit_code == 0, res.output
    assert f"[mixport] removed {staged}, left by an interrupted mixport run (pid {proc.pid} is gone)" in res.output
    assert _hidden(tmp_path) == [] and (out / artifact.MANIFEST).is_file()


def test_a_live_processs_staging_folder_is_never_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = ("import sys, time; from pathlib import Path; from mixport import staging; "
            "print(staging.make(Path(sys.argv[1])), flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        live = Path(proc.stdout.readline().strip())  # type: ignore[union-attr]
        assert live.is_dir() and live.parent == tmp_path
        assert staging.remove_stale(out) == [] and live.is_dir()
        with artifact.staging_dir(out, force=False) as tmp:  # a whole export beside the live one
            (tmp / "f").write_text("x")
        assert live.is_dir() and (out / "f").is_file()
    finally:
        proc.kill()
        proc.wait()
    notes: list[str] = []
    assert staging.remove_stale(out, notes.append) == [live]  # its process is gone now
    assert not live.exists() and len(notes) == 1 and f"pid {proc.pid} is gone" in notes[0]


def _fields(folder: Path, target: Path) -> list[str]:
    """[pid, start, machine, letters] of a staging folder's name (.NAME.tmp-PID-START-MACHINE-xxxx)."""
    return folder.name[len(f".{target.name}.tmp-"):].split("-")


def test_which_staging_folders_are_stale(tmp_path: Path) -> None:
    """Only folders of processes known to be gone: a PID now running but started at another time is
    a reused PID; a folder made on another host, boot or container is not ours to judge; names
    mixport does not make, links and files are never touched."""
    out = tmp_path / "out"
    mine = staging.make(out)  # this process: alive
    pid, start, machine, _ = _fields(mine, out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    other_machine = format((int(machine, 16) + 1) % 16**8, "08x")
    made = {
        "reused-pid": f".out.tmp-{pid}-{int(start) + 1}-{machine}-abc",
        "dead-pid": f".out.tmp-{dead.pid}-{start}-{machine}-abc",
        "dead-pid-unknown-start": f".out.tmp-{dead.pid}-0-{machine}-def",
        "other-machine": f".out.tmp-{dead.pid}-{start}-{other_machine}-abc",
        "old-style": ".out.tmp-k2j4_x9q",
        "other-target": f".out2.tmp-{dead.pid}-{start}-{machine}-abc",
    }
    for name in made.values():
        (tmp_path / name).mkdir()
    (tmp_path / f".out.tmp-{dead.pid}-{start}-{machine}-file").write_text("a file")
    target = tmp_path / "keep-me"
    target.mkdir()
    (target / "data").write_text("x")
    (tmp_path / f".out.tmp-{dead.pid}-{start}-{machine}-link").symlink_to(target, target_is_directory=True)
    removed = staging.remove_stale(out, lambda _line: None)
    assert sorted(p.name for p in removed) == sorted(made[k] for k in ("reused-pid", "dead-pid",
                                                                        "dead-pid-unknown-start"))
    assert mine.is_dir() and (target / "data").is_file()
    for key in ("other-machine", "old-style", "other-target"):
        assert (tmp_path / made[key]).is_dir()


# ---- in-process: the exit codes and the handler's lifetime ---------------------------------------

def test_ctrl_c_in_any_command_exits_130_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("mixport.exporter.export.export", interrupted)
    res = invoke("export", "--model", "tiny", "-o", tmp_path / "out", "--no-check")
    assert res.exit_code == 130 and res.output.splitlines() == ["[mixport] interrupted"], res.output


def test_sigterm_raises_where_the_command_is_and_exits_143(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The handler is installed for the command only: before and after it, SIGTERM is what it was."""
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: seen.append(signum))  # never kill pytest
    try:
        def terminated(*_a: object, **_k: object) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # interrupted by the handler's exception
            raise AssertionError("SIGTERM did not interrupt the command")

        monkeypatch.setattr("mixport.exporter.export.export", terminated)
        started = time.monotonic()
        res = invoke("export", "--model", "tiny", "-o", tmp_path / "out", "--no-check")
        assert res.exit_code == 143 and res.output.splitlines() == ["[mixport] terminated"], res.output
        assert time.monotonic() - started < 20 and seen == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]  # the test's own handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_interrupt_a_library_swallows_still_ends_the_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Native code may turn Ctrl-C into an ordinary error that a library's fallback catches (seen once
    under load: the export ran on and exited 0); the latched signal is raised again at the next step."""
    from mixport import passes

    real = passes.run_passes

    def swallowing(*args: object, **kwargs: object) -> object:
        try:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, delivered while the passes run ...
            time.sleep(1)
        except BaseException:  # noqa: BLE001 - ... and swallowed, as a library's fallback would
            pass
        return real(*args, **kwargs)

    monkeypatch.setattr(passes, "run_passes", swallowing)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (not a background job)
    out = tmp_path / "out"
    try:
        res = invoke("export", "--model", "tiny", "-o", out, "--no-check")
    finally:
        signal.signal(signal.SIGINT, old)
    assert res.exit_code == 130, res.output
    assert "[mixport] interrupted" in res.output and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == [], "OUT or a staging folder was left behind"
