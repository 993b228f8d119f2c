"""`mixport serve` started as a real process on 127.0.0.1 (a free port), talked to with the real
`openai` client: one copy of the tiny export per session, one server per module (or per test
that needs its own flags), every server stopped at teardown."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import require_module

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"at http://127\.0\.0\.1:(\d+)/v1")
START_TIMEOUT = 120.0


class Server:
    """One `python -m mixport.cli serve FOLDER --port 0 FLAGS...` process; its stderr goes to a file
    (a pipe nobody reads would fill and block the server)."""

    def __init__(self, folder: Path, log: Path, flags: tuple[str, ...]) -> None:
        self.log = log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "mixport.cli", "serve", str(folder), "--host", "127.0.0.1", "--port", "0",
               "--threads", "1", *flags]
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env)
        self.port = self._wait_ready()
        self.url = f"http://127.0.0.1:{self.port}"

    def _wait_ready(self) -> int:
        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end:
            found = READY.search(self.stderr())
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                pytest.fail(f"mixport serve exited {self.proc.returncode}:\n{self.stderr()}", pytrace=False)
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"mixport serve not ready after {START_TIMEOUT} s:\n{self.stderr()}", pytrace=False)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self, **kwargs: object):  # noqa: ANN201 - openai.OpenAI
        openai = require_module("openai", "openai")
        options: dict = {"max_retries": 0, "timeout": 60, **kwargs}
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", **options)

    def get(self, path: str):  # noqa: ANN201 - httpx.Response
        import httpx

        return httpx.get(f"{self.url}{path}", timeout=30)

    def post(self, path: str, content: bytes | str):  # noqa: ANN201 - httpx.Response
        import httpx

        return httpx.post(f"{self.url}{path}", content=content, headers={"Content-Type": "application/json"},
                          timeout=30)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0.0 when the series has no such sample yet)."""
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        for line in self.get("/metrics").text.splitlines():
            key, _, value = line.rpartition(" ")
            if key == want:
                return float(value)
        return 0.0

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait, then SIGKILL if it did not exit: the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture(scope="session")
def serve_dir(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny export (a server builds its fast graph into the folder once)."""
    require_module("fastapi", "'mixport[serve]'")
    require_module("uvicorn", "'mixport[serve]'")
    require_module("prometheus_client", "'mixport[serve]'")
    dst = tmp_path_factory.mktemp("serve") / "tiny"
    shutil.copytree(tiny_export, dst)
    return dst


@pytest.fixture(scope="module")
def start_server(serve_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """``start_server(*flags)``: a running server; all of them are stopped when the module ends."""
    started: list[Server] = []

    def start(*flags: str) -> Server:
        server = Server(serve_dir, tmp_path_factory.mktemp("serve-log") / "stderr.log", flags)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
