"""Temporary folders beside a target, and how they become the target (or vanish).

Every output mixport writes is made in a hidden folder beside it, ``.NAME.tmp-PID-START-MACHINE-xxxx``,
and renamed into place when complete (``publish_dir``, ``atomic_write``). The name says which
process made it: its PID, its start time (clock ticks since boot, from /proc; 0 where the platform
does not say) and MACHINE, 8 hex digits of a hash of the host name, the boot id and the PID
namespace. A folder whose process is known to be gone (killed with SIGKILL) is removed by the
next writer of the same target (``remove_stale``), which says so. A folder of a live process is
never touched: a PID now running but started at another time is a reused PID (the folder is
stale); a folder made on another host, boot or container is left alone (its PID means nothing here).

    with atomic_write(folder / "manifest.json") as tmp:   # readers see the old file or the new one
        tmp.write_text(...)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from mixport.errors import FileSystemError, OutputExistsError

Notice = Callable[[str], None]  # hears a line for the user (stderr)
_SUFFIX = re.compile(r"\.tmp-(\d+)-(\d+)-([0-9a-f]{8})-[a-z0-9_]+")  # after .NAME: pid, start, machine


def say(message: str) -> None:
    """The default notice: one ``[mixport]`` line on stderr."""
    print(f"[mixport] {message}", file=sys.stderr, flush=True)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of PID from /proc, None when unreadable."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    return None


def _machine() -> str:
    """8 hex digits naming this host, boot and PID namespace: a PID means something only there."""
    parts = [socket.gethostname()]
    for where in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        with contextlib.suppress(OSError):
            parts.append(os.readlink(where) if where.endswith("/pid") else Path(where).read_text().strip())
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:8]


def _me() -> str:
    """What names this process in a staging folder: PID-START-MACHINE."""
    pid = os.getpid()
    info = _stat(pid)
    return f"{pid}-{0 if info is None else info[1]}-{_machine()}"


def _alive(pid: int, start: int, machine: str) -> bool:
    """Might the process that made a staging folder (PID, started at START ticks, on MACHINE) be
    running? False only when it is known to be gone."""
    if pid <= 0 or machine != _machine():
        return True  # another host, boot or container made it (a shared folder): not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # PermissionError: another user's live process
    info = _stat(pid)
    if info is None:
        return True  # no /proc (or hidden): a live PID is all we know
    state, now = info
    if state in ("Z", "X"):
        return False  # killed, not reaped yet
    return not (start and now != start)  # a PID reused by a process started later is not it


def make(target: Path) -> Path:
    """A new, empty hidden folder beside TARGET named after this process (see the module doc)."""
    target = Path(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_me()}-", dir=target.parent))


def stale(target: Path) -> list[tuple[Path, int]]:
    """(folder, pid) of each staging folder beside TARGET whose process is gone."""
    target = Path(target)
    prefix = f".{target.name}"
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return []
    found = []
    for path in sorted(entries):
        match = _SUFFIX.fullmatch(path.name[len(prefix):]) if path.name.startswith(prefix) else None
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        pid = int(match[1])
        if not _alive(pid, int(match[2]), match[3]):
            found.append((path, pid))
    return found


def remove_stale(target: Path, notice: Notice | None = None) -> list[Path]:
    """Remove the staging folders beside TARGET left by processes that are gone; say so for each."""
    removed = []
    for path, pid in stale(target):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            removed.append(path)
            (notice or say)(f"removed {path}, left by an interrupted mixport run (pid {pid} is gone)")
    return removed


def umask() -> int:
    """This process's umask, read without changing it where Linux allows (no window for threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_dir(tmp: Path, target: Path) -> None:
    """Rename the folder TMP to TARGET, given the mode any new folder gets (0777 & ~umask; mkdtemp
    made it 0700). An existing TARGET (an empty folder, or one the caller checked may be replaced)
    is moved into a staging folder first and removed once TMP is in place; on failure it is put back."""
    tmp, target = Path(tmp), Path(target)
    os.chmod(tmp, (tmp.stat().st_mode & stat.S_ISGID) | (0o777 & ~umask()))  # setgid: inherited from the parent
    if not os.path.lexists(target):
        tmp.rename(target)
        return
    trash = make(target)
    old = trash / "replaced"
    target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        old.rename(target)
        shutil.rmtree(trash, ignore_errors=True)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def fsync_dir(folder: Path) -> None:
    """Make the renames in FOLDER durable (where the platform can open a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def resolved(path: Path) -> Path:
    """PATH absolute, symlinks resolved as far as they exist."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return Path(os.path.normpath(Path(path).absolute()))


def inside(path: Path, folder: Path) -> bool:
    """Is PATH FOLDER itself or under it? Symlinks resolved; a folder reached by another name (a bind
    mount, a case-insensitive disk) is found by its inode."""
    path, folder = resolved(path), resolved(folder)
    if path == folder or folder in path.parents:
        return True
    try:
        target = folder.stat()
    except OSError:
        return False
    for step in (path, *path.parents):
        with contextlib.suppress(OSError):
            if os.path.samestat(step.stat(), target):
                return True
    return False


def check_writable(target: Path) -> None:
    """Refuse TARGET when no folder could be made there: its nearest existing ancestor is not a
    folder, or this user cannot write into it (checked up front, before hours of work)."""
    target = Path(target).absolute()
    parent = next(p for p in target.parents if os.path.lexists(p) or p == p.parent)
    if not parent.is_dir():
        raise FileSystemError("the output's location is not a folder", given=str(parent),
                              expected=f"a folder to write {target.name} in", hint="choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FileSystemError("cannot write the output's location (permission denied)", given=str(parent),
                              expected=f"a folder this user may write {target.name} in", hint="choose another -o")


def check_output_file(dst: Path, inputs: Iterable[Path]) -> None:
    """Refuse to write DST (or its weights file DST.data) over one of ``inputs`` (a model and its
    external data files): the output would destroy what it is made from."""
    dst, inputs = Path(dst), [Path(p) for p in inputs]
    for out in (dst, dst.with_name(f"{dst.name}.data")):
        for src in inputs:
            if resolved(out) == resolved(src) or same_file(out, src):
                raise OutputExistsError("the output would replace an input file", given=f"-o {dst}: {out} is "
                                        f"the input {src}", expected="an output path apart from the input model "
                                        "and its weights files", hint="choose another -o")


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def atomic_write(path: Path, notice: Notice | None = None) -> Iterator[Path]:
    """Yield a temp path to write PATH at; on success it replaces PATH by a rename, on error it vanishes.

    The temp path has PATH's own name inside a hidden folder beside PATH, so files a writer puts
    beside it under derived names keep them (model.onnx -> model.onnx.data): every file there named
    PATH or PATH.* is fsynced, given the umask's default mode and renamed beside PATH, PATH last
    (whoever sees the new PATH finds its companions). Other files there (work files) are dropped.
    Such folders of a killed writer of PATH are removed first (``notice`` hears of each)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path, notice)
    tmp = make(path)
    try:
        yield tmp / path.name
        written = [p for p in tmp.iterdir() if p.name.startswith(f"{path.name}.") and p.is_file()]
        mode = 0o666 & ~umask()
        for src in [*written, tmp / path.name]:
            with src.open("rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(src, mode)
            os.replace(src, path.parent / src.name)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
