"""``mixport serve``: the app under uvicorn on host:port, with a graceful SIGTERM.

SIGTERM (or Ctrl-C): the listener closes (new connections are refused; a request on an open
keep-alive connection gets 503), in-flight and queued requests get ``--drain-timeout`` seconds
to finish (the scheduler then cancels the rest: a stream ends with an error event, a waiting
request with a 503), and the process exits 0."""

from __future__ import annotations

import contextlib
import copy
import signal
import socket
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from mixport.errors import RuntimeFailure
from mixport.serve.app import ServeOptions, ServeState, build_app

GRACE = 5.0  # seconds uvicorn waits past the drain timeout before it cancels the last responses


def log_config() -> dict[str, Any]:
    """uvicorn's logging with the access log on stderr too (stdout stays for results)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return config


def serve_folder(folder: Path, options: ServeOptions, host: str = "127.0.0.1", port: int = 8000,
                 progress: Callable[[str], None] | None = None) -> None:
    """Load ``folder``, serve it until SIGTERM / Ctrl-C, drain, return (the CLI then exits 0)."""
    if progress:
        progress(f"loading {folder}")
    app = build_app(folder, options)
    state: ServeState = app.state.mixport
    config = uvicorn.Config(app, host=host, port=port, log_config=log_config(), lifespan="on",
                            timeout_graceful_shutdown=int(options.drain_timeout + GRACE))
    server = DrainingServer(config, state, progress)
    try:
        server.run()
    except SystemExit:  # uvicorn exits 3 when it cannot listen; mixport's 3 means a parity failure
        if server.started:
            raise
        raise RuntimeFailure(f"cannot listen on {host}:{port}", given="uvicorn's error above",
                             expected="a free port on an address of this machine",
                             hint="--port 0 picks a free port") from None
    finally:
        state.close()  # also when uvicorn failed to start (port in use): stop the scheduler's thread


class DrainingServer(uvicorn.Server):
    """uvicorn's Server whose exit signals start the scheduler's drain, and are not raised again
    after the shutdown (uvicorn re-raises them, which would end the process with 143)."""

    def __init__(self, config: uvicorn.Config, state: ServeState,
                 progress: Callable[[str], None] | None = None) -> None:
        super().__init__(config)
        self.state, self.progress = state, progress

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.progress:  # the port actually bound (--port 0: a free one)
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            pipe, sched = self.state.pipeline, self.state.scheduler
            self.progress(f"serving {self.state.model!r} ({pipe.backend}, {pipe.graph} graph, max batch "
                          f"{sched.max_batch}, queue {self.state.options.max_queue}) at http://{host}:{port}/v1")

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.begin_drain()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
