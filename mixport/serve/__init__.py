"""``mixport serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the runtime's
continuous-batching Scheduler, with Prometheus metrics.

* ``protocol``: the request bodies (pydantic) and their mapping to a scheduler ``Job``;
* ``errors``: OpenAI's error JSON, for every refusal (never FastAPI's 422 or a traceback);
* ``responses``: the response and server-sent-event chunk bodies;
* ``metrics``: the Prometheus series (one registry per app), the scheduler's observer;
* ``app``: ``ServeOptions``, ``build_app(folder, options)`` and the routes;
* ``server``: uvicorn on host:port, with the SIGTERM drain.
"""

from __future__ import annotations

from mixport.errors import RuntimeFailure


def require_deps() -> None:
    """The serving packages are an extra: name it when one is missing (before anything loads)."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise RuntimeFailure("the serving packages are not installed", given=str(exc),
                             expected="fastapi, uvicorn and prometheus-client",
                             hint="pip install 'mixport[serve]'") from None
