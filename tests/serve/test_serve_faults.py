"""`mixport serve` under faults: a full queue answers 429 with Retry-After; SIGTERM lets the
in-flight request finish and exits 0, or, past --drain-timeout, ends what is left with an error
(never a hang); a bad folder is the CLI's one-line error. Each server here has its own flags."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.helpers import invoke, one_line_error

PROMPT = "The ship sailed"


def long_stream(client, max_tokens: int = 480):  # noqa: ANN001, ANN201 - an openai Stream that has begun
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = iter(stream)
    first = next(chunks)
    return stream, chunks, first


def test_full_queue_is_429_with_retry_after(start_server) -> None:
    import openai

    server = start_server("--max-batch", "1", "--max-queue", "1")
    client = server.client()
    running, chunks, _ = long_stream(client)  # holds the only row (chunks kept: collecting it closes the stream)
    queued = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=480, temperature=0, stream=True)
    health = server.get("/health").json()
    assert health["queue_depth"] == 1, (health, server.stderr())
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    assert caught.value.status_code == 429
    assert int(caught.value.response.headers["retry-after"]) >= 1
    error = caught.value.response.json()["error"]
    assert error["code"] == "queue_full" and "queue is full" in error["message"]
    assert server.metric("mixport_requests_total", endpoint="/v1/completions", status="429") == 1
    running.close()
    queued.close()
    del chunks
    deadline = time.monotonic() + 10
    while (server.get("/health").json()["active"] or server.get("/health").json()["queue_depth"]) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3,
                                     temperature=0).usage.completion_tokens == 3


def test_sigterm_finishes_the_in_flight_stream_then_exits_0(start_server) -> None:
    import openai

    server = start_server("--drain-timeout", "60")
    client = server.client()
    _, chunks, first = long_stream(client, 400)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:  # the listener is closed (or, on an open connection, 503): never a new generation
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
        raise AssertionError("a request after SIGTERM was answered")
    except openai.APIConnectionError:
        pass
    except openai.APIStatusError as exc:
        assert exc.status_code == 503
    rest = list(chunks)
    text = first.choices[0].text + "".join(c.choices[0].text for c in rest if c.choices)
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
    assert rest[-1].usage.completion_tokens == 400 and text
    assert server.proc.wait(60) == 0, server.stderr()
    assert "Traceback" not in server.stderr()


def test_sigterm_past_the_drain_timeout_ends_requests_with_an_error(start_server) -> None:
    """--drain-timeout 0: the running and the queued request end at once with an error event
    (the openai client raises it), never a hang; the process still exits 0."""
    import openai

    server = start_server("--max-batch", "1", "--drain-timeout", "0")
    client = server.client()
    _, running, _ = long_stream(client)
    queued = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=480, temperature=0, stream=True)
    server.proc.send_signal(signal.SIGTERM)
    for stream in (running, queued):
        with pytest.raises(openai.APIError, match="shutting down"):
            list(stream)
    assert server.proc.wait(60) == 0, server.stderr()


def test_bad_folder_is_one_line_error(tmp_path: Path) -> None:
    one_line_error(invoke("serve", tmp_path / "missing"), str(tmp_path / "missing"))
    result = invoke("serve", "--help")
    assert result.exit_code == 0 and "OpenAI-compatible" in result.output and "mixport serve out" in result.output
