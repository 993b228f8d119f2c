"""``mixport serve OUT --ray``: the same FastAPI app as a Ray Serve deployment.

Each replica builds the app itself (``build_app`` in ``__serve_build_asgi_app__``, Ray Serve
2.60's late-bound ingress): it loads the pipeline and runs its own continuous-batching scheduler;
Ray Serve's HTTP proxy and router spread requests over the replicas. A fixed count
(``--replicas N``) or Ray Serve's autoscaler (``--autoscale MIN:MAX``, scaling on ongoing requests
per replica with a target of one full batch).

* Local Ray by default (``ray.init`` with the CPUs the replicas need, no dashboard), an existing
  cluster with ``--address HEAD:6379``: there OUT must be readable at the same path on every node
  that runs a replica, and mixport installed there.
* A replica gets one GPU (``num_gpus=1``) when the export has a TensorRT engine and the cluster has
  GPUs (``load`` then picks TensorRT inside it when the engine fits that GPU), CPUs otherwise.
* A replica that dies is replaced by Ray Serve's controller; requests in flight on it fail, never
  hang: with ``ray_proxy``'s middleware in the proxy (set up for a local instance) a 503 with OpenAI's
  error JSON, or a last error event on a stream under way; later requests go to live replicas.
* SIGTERM / Ctrl-C: the app is deleted (replicas drain for up to ``--drain-timeout``), Serve and
  the local Ray instance are shut down, exit 0.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixport.errors import RayServeError

if TYPE_CHECKING:
    from mixport.serve.app import ServeOptions

APP_NAME = "mixport"
HEALTH_PERIOD_S = 2.0
HEALTH_TIMEOUT_S = 30.0
SHUTDOWN_GRACE_S = 30.0  # past the drain timeout, for Serve's controller, proxy and Ray to stop


@dataclass(frozen=True)
class RayOptions:
    """Where and how many: ``replicas`` or ``autoscale`` (min, max), never both; ``address``:
    an existing cluster (None: a local Ray instance, stopped on exit)."""

    replicas: int | None = None
    autoscale: tuple[int, int] | None = None
    address: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000

    def most(self) -> int:
        return self.autoscale[1] if self.autoscale else self.replicas or 1


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` -> (min, max), 0 <= MIN <= MAX, MAX >= 1."""
    parts = text.split(":")
    try:
        low, high = (int(p) for p in parts)
    except ValueError:
        low = high = -1
    if len(parts) != 2 or low < 0 or high < max(low, 1):
        raise RayServeError("bad --autoscale", given=text, expected="MIN:MAX with 0 <= MIN <= MAX and MAX >= 1",
                            hint="e.g. --autoscale 1:4")
    return low, high


def check_combination(ray: bool, replicas: int | None, autoscale: str | None, address: str | None) -> None:
    """The ``--ray`` flags that do not go together (one-line errors)."""
    if not ray and (replicas is not None or autoscale is not None or address is not None):
        given = " ".join(f for f, v in (("--replicas", replicas), ("--autoscale", autoscale),
                                        ("--address", address)) if v is not None)
        raise RayServeError("replica options need --ray", given=given, expected="mixport serve OUT --ray ...")
    if replicas is not None and autoscale is not None:
        raise RayServeError("--replicas and --autoscale exclude each other",
                            given=f"--replicas {replicas} --autoscale {autoscale}",
                            expected="a fixed count (--replicas N) or a range (--autoscale MIN:MAX)")
    if replicas is not None and replicas < 1:
        raise RayServeError("bad --replicas", given=replicas, expected="an integer >= 1")


def require_ray() -> None:
    """Ray Serve is part of the ``serve`` extra: name it when missing."""
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        raise RayServeError("Ray Serve is not installed", given=str(exc), expected="ray[serve]",
                            hint="pip install 'mixport[serve]'") from None


def _replica_class() -> type:
    """The deployment's class (Ray imported here, so ``mixport serve`` without --ray needs no Ray)."""
    from ray import serve

    @serve.ingress()
    class MixportReplica:
        """One replica: the app, its pipeline and its scheduler, built in the replica's process."""

        def __init__(self, folder: str, options: ServeOptions) -> None:
            self.folder, self.options = folder, options

        def __serve_build_asgi_app__(self) -> Any:
            from mixport.serve.app import build_app

            return build_app(Path(self.folder), self.options)

    return MixportReplica


def replica_resources(has_engine: bool, cluster: dict[str, float], cpus: int) -> dict[str, float]:
    """``ray_actor_options``: one GPU when the export has a TensorRT engine and the cluster
    (``ray.cluster_resources()``) has GPUs (the replica's ``load`` then picks TensorRT when the
    engine fits that GPU), else CPUs only (ONNX Runtime)."""
    if has_engine and cluster.get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": cpus}
    return {"num_cpus": cpus}


def deployment_options(options: ServeOptions, ray_options: RayOptions, actor: dict[str, float]) -> dict[str, Any]:
    """Arguments of ``serve.deployment``: the replica count or autoscaler, resources, health
    checks, and as many ongoing requests per replica as its batch and queue hold (the app answers
    429 past that, as without Ray)."""
    max_batch, max_queue = options.max_batch, options.max_queue
    found: dict[str, Any] = {
        "name": "MixportReplica",
        "ray_actor_options": actor,
        "max_ongoing_requests": max_batch + max_queue,
        "health_check_period_s": HEALTH_PERIOD_S,
        "health_check_timeout_s": HEALTH_TIMEOUT_S,
        "graceful_shutdown_timeout_s": float(options.drain_timeout),
        "graceful_shutdown_wait_loop_s": 1.0,
        "max_constructor_retry_count": 1,
    }
    if ray_options.autoscale:
        low, high = ray_options.autoscale
        found["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                       "target_ongoing_requests": max_batch, "upscale_delay_s": 5.0,
                                       "downscale_delay_s": 60.0}
    else:
        found["num_replicas"] = ray_options.replicas or 1
    return found


def _check_folder(folder: Path, options: ServeOptions) -> None:
    """Fail here, in one line, rather than in every replica; build the fast graph once, before
    the replicas race to."""
    from mixport import artifact
    from mixport.artifact import Manifest
    from mixport.runtime import ort_graph

    manifest = Manifest.read(folder)
    artifact.validate_folder(folder, manifest)
    if options.graph == "fast" or (options.graph == "auto"
                                   and ort_graph.supported(manifest.config, manifest.dtype) is None):
        ort_graph.ensure(folder, manifest, _say)  # refuses (one line) a model the fast graph cannot build


def _say(msg: str) -> None:
    print(f"mixport serve: {msg}", file=sys.stderr, flush=True)


def _start_ray(ray_options: RayOptions, cpus_needed: int) -> None:
    import ray

    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "logging_level": logging.WARNING, "configure_logging": True}
    try:
        if ray_options.address:
            ray.init(address=ray_options.address, **kwargs)
        else:  # the proxy of a local instance inherits this process's environment
            from mixport.serve import ray_proxy

            os.environ.setdefault(ray_proxy.ENV, ray_proxy.IMPORT_PATH)
            ray.init(num_cpus=max(os.cpu_count() or 1, cpus_needed), object_store_memory=96 * 2**20, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = ray_options.address or "a local Ray instance"
        hint = "check the address and that this machine runs the cluster's Ray version"
        if "AuthenticationError" in repr(exc.__cause__) or "InvalidAuthToken" in str(exc.__cause__):
            hint = ("the cluster uses token authentication: export RAY_AUTH_MODE=token, with the cluster's token "
                    "in ~/.ray/auth_token or RAY_AUTH_TOKEN")
        raise RayServeError("cannot start or reach Ray", given=f"{where}: {str(exc).splitlines()[0]}",
                            expected="a running Ray cluster at --address (ray start --head), or none for local",
                            hint=hint) from None


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A quick TCP connection to HEAD:PORT: Ray itself retries an address nothing answers for minutes."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RayServeError("bad --address", given=address, expected="HOST:PORT of the head's GCS, e.g. HEAD:6379")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RayServeError("nothing answers at --address", given=f"{address} ({exc.strerror or exc})",
                            expected="the head node of a running Ray cluster (ray start --head --port PORT)",
                            hint="check the host and port `ray start --head` printed") from None


def _cpus_per_replica(options: ServeOptions, ray_options: RayOptions) -> int:
    if options.threads:
        return options.threads
    if ray_options.address:
        return 1
    return max(1, (os.cpu_count() or 1) // ray_options.most())


def deploy(folder: Path, options: ServeOptions, ray_options: RayOptions,
           after_init: Callable[[], None] | None = None) -> str:
    """Start Ray (or connect), start Serve's proxy on host:port, run the app; its URL.
    ``after_init()`` runs once Ray is up (``ray.init`` replaces the SIGTERM handler)."""
    import ray
    from ray import serve

    from mixport.artifact import Manifest

    if ray_options.address:
        check_reachable(ray_options.address)
    folder = folder.resolve()
    _check_folder(folder, options)
    cpus = _cpus_per_replica(options, ray_options)
    options = dataclasses.replace(options, threads=cpus)
    _start_ray(ray_options, cpus * ray_options.most())
    if after_init:
        after_init()
    actor = replica_resources(Manifest.read(folder).engine is not None, ray.cluster_resources(), cpus)
    serve.start(http_options={"host": ray_options.host, "port": ray_options.port})
    spec = serve.deployment(_replica_class(), **deployment_options(options, ray_options, actor))
    try:
        serve.run(spec.bind(str(folder), options), name=APP_NAME, route_prefix="/")
    except Exception as exc:  # noqa: BLE001 - Ray raises its own types for a replica that fails to start
        raise RayServeError("the Ray Serve deployment failed to start", given=str(exc).strip().splitlines()[-1],
                            expected="replicas that load the export",
                            hint="see the replica logs under the Ray session folder") from None
    return f"http://{ray_options.host}:{ray_options.port}/v1"


def shutdown() -> None:
    """Delete the app (replicas drain), stop Serve (unless the cluster runs other applications)
    and disconnect, which stops a local Ray instance."""
    import ray
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        try:
            others = [name for name in serve.status().applications if name != APP_NAME]
        except RayServeException:  # Serve never started
            return
        if others:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
    finally:
        ray.shutdown()


def serve_on_ray(folder: Path, options: ServeOptions, ray_options: RayOptions) -> int:
    """Deploy, wait for SIGTERM / SIGINT, shut down; 0."""
    require_ray()
    import ray

    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def install() -> None:
        for sig in previous:
            if previous[sig] is not signal.SIG_IGN:  # an ignored SIGINT (a background job) stays ignored
                signal.signal(sig, lambda *_: stop.set())

    install()
    try:
        url = deploy(folder, options, ray_options, after_init=install)
        count = "..".join(map(str, ray_options.autoscale)) if ray_options.autoscale else str(ray_options.replicas or 1)
        gcs = ray.get_runtime_context().gcs_address
        _say(f"Ray Serve ready at {url} ({count} replicas, Ray at {gcs}); Ctrl-C or SIGTERM stops it")
        while not stop.wait(0.5):
            pass
        _say("stopping: draining the replicas, shutting Serve down")
        return 0
    finally:
        if ray.is_initialized():
            _bounded_shutdown(float(options.drain_timeout) + SHUTDOWN_GRACE_S)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _bounded_shutdown(limit: float) -> None:
    """``shutdown()`` within LIMIT seconds. Past it (Ray's own processes were stopped under it, e.g.
    a SIGTERM sent to the whole process group), say so and end the process: exit 1, without the
    atexit hooks that would wait on the same dead cluster."""
    start = time.monotonic()
    worker = threading.Thread(target=shutdown, name="mixport-ray-shutdown", daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        _say(f"error: Ray Serve did not shut down within {limit:.0f} s (were Ray's own processes stopped too?); "
             "exiting")
        os._exit(1)
    _say(f"stopped in {time.monotonic() - start:.1f} s")
