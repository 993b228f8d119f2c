"""`mixport serve OUT --ray --replicas 2` on a local Ray instance (issue 14, items 3-5): the openai
client gets completions through Ray Serve's proxy on 127.0.0.1; a replica killed (SIGKILL of its
process) under load fails the requests it held with an error, none hang; Serve brings the replica
count back to 2 and requests after that succeed; SIGTERM shuts Serve and Ray down, exit 0.

The server runs in its own process with its own RAY_TMPDIR; the finalizer kills every process
whose environment names that folder (the local Ray instance's, and only them)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import invoke, one_line_error, require_module

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
READY = "Ray Serve ready at "


@dataclass
class RayServer:
    proc: subprocess.Popen
    base: str
    gcs: str
    log: Path
    env: dict[str, str]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _ours(tmpdir: str) -> list[int]:
    """Pids of this user's processes whose environment holds RAY_TMPDIR=tmpdir."""
    mark = f"RAY_TMPDIR={tmpdir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _kill_all(tmpdir: str) -> None:
    for pid in _ours(tmpdir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_ready(proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    """The Ray address from the server's ready line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        if READY in text:
            return text.split(READY, 1)[1].split("Ray at ", 1)[1].split(")", 1)[0]
        if proc.poll() is not None:
            pytest.fail(f"mixport serve --ray exited with {proc.returncode}:\n{text[-4000:]}")
        time.sleep(0.5)
    pytest.fail(f"mixport serve --ray not ready after {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def ray_server(tiny_export: Path) -> Iterator[RayServer]:
    require_module("ray.serve", "'mixport[serve]'")
    tmpdir = tempfile.mkdtemp(prefix="mxray-", dir="/tmp")  # short: Ray's socket paths are limited
    port, log = _free_port(), Path(tmpdir) / "serve.log"
    env = {**os.environ, "RAY_TMPDIR": tmpdir, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "mixport.cli", "serve", str(tiny_export), "--ray", "--replicas", "2",
           "--host", HOST, "--port", str(port), "--max-batch", "1", "--max-queue", "32", "--drain-timeout", "5"]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
    try:
        yield RayServer(proc, f"http://{HOST}:{port}/v1", _wait_ready(proc, log), log, env)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        try:  # Ray's processes in the server's process group (its agents keep no RAY_TMPDIR), then the rest
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _kill_all(tmpdir)
        shutil.rmtree(tmpdir, ignore_errors=True)


def _client(server: RayServer, timeout: float = 60.0):  # noqa: ANN202 - openai.OpenAI
    openai = require_module("openai")
    return openai.OpenAI(base_url=server.base, api_key="none", timeout=timeout, max_retries=0)


# Run in a child process that joins the server's Ray instance as a driver (keeping Ray's driver state
# out of pytest's process). A local instance enables token auth (the token in ~/.ray/auth_token); a
# driver given an address must ask for it with RAY_AUTH_MODE=token.
RAY_STATE = """
import json, os, sys, time
import ray
from ray import serve
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
def replicas():
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::mixport#")]
    get = lambda n: ray.get_actor(n, namespace="serve").__ray_call__.remote(lambda _self: os.getpid())
    return {n: ray.get(get(n), timeout=30) for n in names}
def running():
    d = serve.status().applications["mixport"].deployments["MixportReplica"]
    return d.replica_states.get("RUNNING", 0) if d.status.value == "HEALTHY" else -1
gone, deadline = sys.argv[2:], time.monotonic() + 90
found = replicas()
while gone and time.monotonic() < deadline and not (running() == 2 and not set(gone) & set(found)):
    time.sleep(0.5)
    found = replicas()
print(json.dumps({"replicas": found, "running": running()}))
"""


def _ray_state(server: RayServer, *gone: str) -> dict:
    """{"replicas": {actor name: pid}, "running": count}; with GONE names: once Serve replaced them
    (or after 90 s)."""
    res = subprocess.run([sys.executable, "-c", RAY_STATE, server.gcs, *gone], capture_output=True, text=True,
                         timeout=180, env={**server.env, "RAY_AUTH_MODE": "token"})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _stream(client, prompt: str, max_tokens: int) -> tuple[str, str | None]:  # noqa: ANN001
    """(text, finish_reason) of a streamed greedy completion."""
    text, finish = [], None
    for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True):
        text.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish


def _outcome(client, prompt: str) -> str:  # noqa: ANN001
    """"ok", or the error's type name and message; a timeout here would mean a request hung."""
    try:
        _, finish = _stream(client, prompt, 400)
        return "ok" if finish else "no finish_reason"
    except Exception as exc:  # noqa: BLE001 - what the client raises is what the test reports
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.slow
def test_ray_serve_answers_survives_a_replica_kill_and_stops_on_sigterm(ray_server: RayServer) -> None:
    client = _client(ray_server)
    whole = client.completions.create(model="tiny", prompt="hello there", max_tokens=12, temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    assert _stream(client, "hello there", 12) == (whole.choices[0].text, "length")  # same greedy text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert chat.choices[0].message.content is not None

    before = _ray_state(ray_server)
    assert len(before["replicas"]) == 2 and before["running"] == 2, before

    # 8 long requests, one batch row per replica: both replicas hold several when one is killed
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_outcome, client, f"request {i} " * (1 + i % 3)) for i in range(8)]
        time.sleep(1.0)
        victim = sorted(before["replicas"])[0]
        os.kill(before["replicas"][victim], signal.SIGKILL)
        outcomes = [f.result(timeout=120) for f in futures]
    failed = [o for o in outcomes if o != "ok"]
    assert "ok" in outcomes and failed, outcomes  # requests on the other replica finished
    # each failed one says why (not a timeout: nothing hung): a 503 before the response started,
    # or the stream's last event
    assert all(o.startswith(("APIError", "InternalServerError")) and "replica running it stopped" in o
               for o in failed), outcomes

    after = _ray_state(ray_server, victim)
    assert len(after["replicas"]) == 2 and victim not in after["replicas"] and after["running"] == 2, after
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda i: _stream(client, f"after {i}", 8)[1], range(6))) == ["length"] * 6

    ray_server.proc.send_signal(signal.SIGTERM)
    assert ray_server.proc.wait(90) == 0, ray_server.log.read_text()[-3000:]
    assert "stopped in" in ray_server.log.read_text()


@pytest.mark.parametrize(("args", "fragments"), [
    (("--replicas", "2"), ("replica options need --ray", "--replicas")),
    (("--ray", "--replicas", "2", "--autoscale", "1:3"), ("--replicas and --autoscale exclude each other",)),
    (("--ray", "--autoscale", "3:1"), ("bad --autoscale", "3:1", "MIN:MAX")),
    (("--ray", "--autoscale", "two"), ("bad --autoscale", "two")),
    (("--ray", "--replicas", "0"), ("bad --replicas", "given: 0")),
    (("--ray", "--address", "127.0.0.1:1"), ("nothing answers at --address", "127.0.0.1:1")),
    (("--ray", "--address", "head"), ("bad --address", "HOST:PORT")),
])
def test_bad_ray_flags_are_one_line_errors(tmp_path: Path, args: tuple[str, ...], fragments: tuple[str, ...]) -> None:
    """Refused before anything is loaded or started (the folder need not exist)."""
    one_line_error(invoke("serve", tmp_path / "out", *args), *fragments)


@pytest.mark.parametrize("ray_options", [{"replicas": 3}, {"autoscale": (0, 4)}])
def test_deployment_options_are_what_ray_serve_accepts(ray_options: dict) -> None:
    """Ray Serve validates them (without starting Ray): replicas or autoscaler, the replica's
    resources, max ongoing requests = max batch + max queue, drain = --drain-timeout."""
    require_module("ray.serve", "'mixport[serve]'")
    from ray import serve

    from mixport.serve import ray_app
    from mixport.serve.app import ServeOptions

    options = ServeOptions(max_batch=4, max_queue=12, drain_timeout=7.0)
    found = ray_app.deployment_options(options, ray_app.RayOptions(**ray_options), {"num_cpus": 1})
    config = serve.deployment(ray_app._replica_class(), **found)._deployment_config
    assert config.max_ongoing_requests == 16 and config.graceful_shutdown_timeout_s == 7.0
    if "replicas" in ray_options:
        assert config.num_replicas == 3 and config.autoscaling_config is None
    else:
        auto = config.autoscaling_config
        assert (auto.min_replicas, auto.max_replicas, auto.initial_replicas) == (0, 4, 1)
        assert auto.target_ongoing_requests == 4


@pytest.mark.parametrize(("has_engine", "cluster", "want"), [
    (True, {"CPU": 16.0, "GPU": 2.0}, {"num_gpus": 1, "num_cpus": 2}),
    (True, {"CPU": 16.0}, {"num_cpus": 2}),  # an engine but no GPU in the cluster: ONNX Runtime
    (False, {"CPU": 16.0, "GPU": 2.0}, {"num_cpus": 2}),  # GPUs but no engine: leave them to others
])
def test_a_replica_asks_for_a_gpu_only_for_an_engine_on_a_gpu_cluster(has_engine: bool, cluster: dict,
                                                                      want: dict) -> None:
    from mixport.serve import ray_app

    assert ray_app.replica_resources(has_engine, cluster, cpus=2) == want
