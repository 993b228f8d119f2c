"""Child processes measured from outside for tools/bench_real_size.py: a memory cgroup each (limit,
peak, OOM kills), the child's own peak RSS, wall time and the disk the step used.

* cgroup v1 (``/sys/fs/cgroup/memory``): a child cgroup of this process's own when it can be made,
  else one at the root; ``memory.limit_in_bytes`` = the step's limit; peak = ``memory.max_usage_in_bytes``,
  which counts page cache (files the step wrote or read first) as well as process memory; OOM = a
  SIGKILL while ``memory.oom_control`` counts an ``oom_kill`` (or ``memory.failcnt`` > 0 on older
  kernels). cgroup v2: ``memory.max`` / ``memory.peak`` / ``memory.events``. The anonymous memory
  of the cgroup (``total_rss`` / ``anon`` in memory.stat) is also sampled every ``POLL`` seconds.
* No cgroup (not Linux, not root, no memory controller): the peak is the child's VmHWM alone and
  no limit is enforced; ``Measured.measure`` says which.
* VmHWM is what the child reports of itself at its end (``real_size_child.status``); ru_maxrss comes
  from wait4 and is the fallback for a child that was killed (it includes the parent's RSS at fork).
* Disk: the filesystem's free space (statvfs) is sampled too: peak use = free at start - least free
  (other jobs on the same disk count as well).

Standard library only, so the parent stays small (a forked child's ru_maxrss starts at its size).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")
POLL = 0.2  # seconds between samples of the cgroup's anon memory and the disk
CHILD = Path(__file__).resolve().parent / "real_size_child.py"


def own_cgroup(kind: str) -> str:
    """This process's cgroup path for the v1 ``memory`` controller (kind "v1") or the v2 hierarchy."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (kind == "v1" and "memory" in controllers.split(",")) or (kind == "v2" and controllers == ""):
            return path
    return ""


class Cgroup:
    """One memory cgroup for one child; ``create`` returns None (with why) where none can be made."""

    def __init__(self, path: Path, version: str) -> None:
        self.path, self.version = path, version

    @classmethod
    def create(cls, name: str, limit: int | None) -> tuple[Cgroup | None, str]:
        errors = []
        candidates = []
        if (V1_ROOT / "memory.limit_in_bytes").exists():
            candidates += [(V1_ROOT / own_cgroup("v1").lstrip("/") / name, "v1"), (V1_ROOT / name, "v1")]
        elif (V2_ROOT / "cgroup.controllers").exists():
            candidates += [(V2_ROOT / own_cgroup("v2").lstrip("/") / name, "v2")]
        for path, version in candidates:
            try:
                path.mkdir()
            except OSError as exc:
                errors.append(f"{path}: {exc.strerror}")
                continue
            group = cls(path, version)
            try:
                if limit is not None:
                    group._write("memory.limit_in_bytes" if version == "v1" else "memory.max", str(limit))
                return group, ""
            except OSError as exc:
                errors.append(f"{path}: {exc.strerror}")
                group.remove()
        return None, "; ".join(errors) or "no memory cgroup controller"

    def _write(self, file: str, value: str) -> None:
        (self.path / file).write_text(value)

    def _read(self, file: str) -> str:
        try:
            return (self.path / file).read_text()
        except OSError:
            return ""

    def join(self) -> None:
        """Run in the child before exec: move it (and what it starts) into this cgroup."""
        self._write("cgroup.procs", str(os.getpid()))

    def _stat(self, file: str, key: str) -> int:
        for line in self._read(file).splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
        return 0

    def anon(self) -> int:
        return self._stat("memory.stat", "total_rss" if self.version == "v1" else "anon")

    def peak(self) -> int:
        text = self._read("memory.max_usage_in_bytes" if self.version == "v1" else "memory.peak").strip()
        return int(text) if text.isdigit() else 0

    def oom_killed(self) -> bool:
        if self.version == "v2":
            return self._stat("memory.events", "oom_kill") > 0
        kills = self._stat("memory.oom_control", "oom_kill")
        return kills > 0 or ("oom_kill " not in self._read("memory.oom_control")
                             and int(self._read("memory.failcnt").strip() or 0) > 0)

    def remove(self) -> None:
        for _ in range(20):
            try:
                self.path.rmdir()
                return
            except OSError:
                if self.version == "v1":
                    try:
                        self._write("memory.force_empty", "0")
                    except OSError:
                        pass
                time.sleep(0.1)


@dataclass
class Measured:
    """One child step: how it ended and what it used."""

    status: str = ""  # ok | OOM | failed (rc N) | killed (SIGx) | timeout
    rc: int | None = None
    wall_s: float = 0.0
    measure: str = ""  # which peak this is: the cgroup's, or VmHWM only (and why)
    limit_bytes: int | None = None
    cgroup_peak_bytes: int | None = None  # memory.max_usage_in_bytes / memory.peak: RSS + page cache
    cgroup_anon_peak_bytes: int | None = None  # sampled anon memory of the cgroup
    vmhwm_bytes: int | None = None  # the child's own, from its result
    ru_maxrss_bytes: int | None = None  # wait4's (includes the parent's RSS at fork)
    disk_peak_bytes: int = 0  # statvfs: free at start - least free during the step (whole filesystem)
    result: dict[str, Any] = field(default_factory=dict)  # what the child wrote
    log: str = ""

    @property
    def peak_bytes(self) -> int | None:
        """The step's peak memory by its measure: the cgroup's when there was one, else VmHWM."""
        return self.cgroup_peak_bytes if self.cgroup_peak_bytes else self.vmhwm_bytes or self.ru_maxrss_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _ended(status: int, group: Cgroup | None) -> tuple[str, int]:
    rc = os.waitstatus_to_exitcode(status)
    if rc >= 0:
        return ("ok" if rc == 0 else f"failed (rc {rc})"), rc
    if rc == -signal.SIGKILL and group is not None and group.oom_killed():
        return "OOM", rc
    return f"killed ({signal.Signals(-rc).name})", rc


def run_child(step: str, spec: dict[str, Any], log: Path, name: str, limit: int | None, disk: Path,
              timeout: float | None = None) -> Measured:
    """Run ``real_size_child.py STEP SPEC RESULT`` in a cgroup of its own (limit bytes or none) and
    measure it; its stdout and stderr go to LOG."""
    group, why = Cgroup.create(f"{name}-{os.getpid()}", limit)
    m = Measured(limit_bytes=limit if group else None, log=str(log),
                 measure=f"cgroup {group.version} peak (RSS + page cache)" if group else f"VmHWM only ({why})")
    result = log.with_suffix(".result.json")
    result.unlink(missing_ok=True)
    path = [str(CHILD.parent.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}  # mixport from this tool's tree
    free0 = least = _free(disk)
    anon = 0
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(CHILD), step, json.dumps(spec), str(result)], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=group.join if group else None)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if timeout is not None and time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                m.status = "timeout"
                break
            anon, least = max(anon, group.anon() if group else 0), min(least, _free(disk))
            time.sleep(POLL)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    m.wall_s = time.perf_counter() - t0
    ended, m.rc = _ended(status, group)
    m.status = m.status or ended
    m.ru_maxrss_bytes = usage.ru_maxrss * 1024
    m.disk_peak_bytes = max(0, free0 - min(least, _free(disk)))
    if group:
        m.cgroup_peak_bytes, m.cgroup_anon_peak_bytes = group.peak(), max(anon, group.anon())
        group.remove()
    if result.is_file():
        m.result = json.loads(result.read_text())
        m.vmhwm_bytes = m.result.get("status", {}).get("VmHWM")
    if m.status == "ok" and not m.result:
        m.status = "failed (no result)"
    return m
