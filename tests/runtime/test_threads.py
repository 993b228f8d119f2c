"""One loaded Pipeline shared by threads: calls are serialized, so every result equals the
single-threaded one. Each scenario runs in a subprocess, so a crash (SIGSEGV, a corrupted heap)
fails the test instead of killing pytest."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from mixport.errors import RuntimeFailure
from mixport.runtime.api import Pipeline

PROMPT = "The ship sailed"

# 4 threads x 10 greedy calls (mixed: generate, generate_ids, stream, batches) on one pipeline
SCRIPT = textwrap.dedent("""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from mixport.runtime import load

    folder, graph = sys.argv[1], sys.argv[2]
    pipe = load(folder, threads=1, graph=graph)
    assert pipe.graph == graph, pipe.graph
    prompts = ["The ship sailed", "Once upon a time", "A B C", "hello"]
    calls = [
        lambda p: pipe.generate(p, 12),
        lambda p: "".join(pipe.stream(p, 12)),
        lambda p: pipe.decode(pipe.generate_ids([pipe.encode(p)], 12)[0]),
        lambda p: pipe.generate([p, "x y"], 12)[0],
    ]
    expected = {(c, p): calls[c](p) for c in range(len(calls)) for p in prompts}

    def worker(t):
        got = []
        for i in range(10):
            key = ((t + i) % len(calls), prompts[(t * 3 + i) % len(prompts)])
            got.append((key, calls[key[0]](key[1])))
        return got

    with ThreadPoolExecutor(4) as pool:
        results = [r for rs in pool.map(worker, range(4)) for r in rs]
    bad = [(key, out, expected[key]) for key, out in results if out != expected[key]]
    assert len(results) == 40 and not bad, bad[:3]
    print("ok", len(results))
""")


@pytest.mark.parametrize("graph", ["fast", "portable"])
def test_four_threads_share_one_pipeline(rt_export: Path, graph: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(rt_export), graph], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok 40", \
        f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def _in_thread(fn: object, timeout: float = 120) -> object:
    """Run ``fn`` on another thread; its result (or exception), or fail when it does not finish."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["out"] = fn()  # type: ignore[operator]
        except Exception as exc:  # handed back to the test
            box["exc"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the other thread is still waiting for the pipeline"
    if "exc" in box:
        raise box["exc"]  # type: ignore[misc]
    return box["out"]


@pytest.mark.parametrize("graph", ["fast", "portable"])
def test_an_abandoned_stream_releases_the_pipeline(pipes: dict[str, Pipeline], graph: str) -> None:
    pipe = pipes[graph]
    expected = pipe.generate(PROMPT, 12)
    stream = pipe.stream(PROMPT, 24)
    next(stream)  # the stream now holds the pipeline...
    del stream  # ...until it is collected (CPython: at once)
    assert _in_thread(lambda: pipe.generate(PROMPT, 12)) == expected
    stream = pipe.stream(PROMPT, 24)
    next(stream)
    stream.close()
    assert _in_thread(lambda: pipe.generate(PROMPT, 12)) == expected


def test_an_open_stream_refuses_a_second_call_in_its_thread(pipes: dict[str, Pipeline]) -> None:
    pipe = pipes["fast"]
    expected = "".join(pipe.stream(PROMPT, 12))
    stream = pipe.stream(PROMPT, 12)
    first = next(stream)
    with pytest.raises(RuntimeFailure, match="already generating in this thread") as err:
        pipe.generate("other words", 12)  # would reset the stream's KV cache under it
    assert "\n" not in str(err.value)
    assert first + "".join(stream) == expected  # the stream was not disturbed
    assert pipe.generate(PROMPT, 12) == pipe.generate(PROMPT, 12)


def test_close_waits_for_the_running_generation_then_refuses(rt_export: Path) -> None:
    from mixport.runtime import load

    pipe = load(rt_export, threads=1, graph="portable")
    expected = pipe.generate(PROMPT, 12)
    stream = pipe.stream(PROMPT, 12)
    first = next(stream)
    closer = threading.Thread(target=pipe.close)
    closer.start()
    closer.join(0.5)
    assert closer.is_alive()  # close() waits while another thread's stream is open
    assert first + "".join(stream) == expected
    closer.join(60)
    assert not closer.is_alive()
    with pytest.raises(RuntimeFailure, match="the pipeline is closed"):
        pipe.generate(PROMPT, 12)
