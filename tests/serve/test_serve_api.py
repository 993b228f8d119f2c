"""`mixport serve` answers the real `openai` client: completions and chat, streamed and not, stop
strings, seeds, logprobs, 8 concurrent greedy requests equal to each prompt alone, a client that
disconnects frees its row, and every refusal is OpenAI's 400 error JSON. One server for the module."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mixport.runtime import load
from tests.helpers import invoke, one_line_error

PROMPTS = ["The ship sailed", "Once upon a time there was a", "A", "x y z",
           "Hello world, this is a much longer prompt about many things and then some more",
           "The cat", "In the beginning the", "Numbers 1 2 3 4 5 6"]


@pytest.fixture(scope="module")
def server(start_server):  # noqa: ANN201 - conftest.Server
    return start_server()


@pytest.fixture(scope="module")
def pipe(serve_dir: Path, server):  # noqa: ANN201 - a Pipeline on the same folder (after the server built its graph)
    with load(serve_dir, threads=1) as p:
        assert p.graph == "fast"
        yield p


def greedy(client, prompt: str | list[int], max_tokens: int, **extra: object):  # noqa: ANN001, ANN201
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, **extra)


def test_completion_whole_and_streamed_equal_the_pipeline(server, pipe) -> None:
    client = server.client()
    expected = pipe.generate(PROMPTS[0], max_new_tokens=12)
    whole = greedy(client, PROMPTS[0], 12)
    choice = whole.choices[0]
    assert (choice.text, choice.finish_reason) == (expected, "length")
    assert whole.usage.prompt_tokens == len(pipe.encode(PROMPTS[0])) and whole.usage.completion_tokens == 12
    assert whole.object == "text_completion" and whole.model == "tiny"
    chunks = list(greedy(client, PROMPTS[0], 12, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) > 2  # pieces as they come
    ids = greedy(client, pipe.encode(PROMPTS[0]), 12)  # a prompt of token ids
    assert ids.choices[0].text == expected
    assert greedy(client, PROMPTS[0], 12, stream=False).choices[0].text == expected  # deterministic
    default = client.completions.create(model="tiny", prompt=PROMPTS[0], temperature=0)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens


def test_chat_whole_and_streamed(server, pipe) -> None:
    client = server.client()
    messages = [{"role": "user", "content": "hello there"}]
    expected = pipe.generate("hello there", max_new_tokens=10, chat=True)
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected
    assert whole.object == "chat.completion" and whole.usage.completion_tokens == 10
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}]
    assert client.chat.completions.create(model="tiny", messages=parts, max_tokens=10,
                                          temperature=0).choices[0].message.content == expected


def test_stop_strings(server, pipe) -> None:
    client = server.client()
    full = pipe.generate(PROMPTS[1], max_new_tokens=24)
    stop = next(full[i:i + 2] for i in range(4, len(full) - 2) if full[i:i + 2].strip() == full[i:i + 2])
    cut = full[:full.index(stop)]
    whole = greedy(client, PROMPTS[1], 24, stop=[stop, "never-in-this-text"])
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (cut, "stop")
    chunks = list(greedy(client, PROMPTS[1], 24, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeds_reproduce(server) -> None:
    client = server.client()

    def sample(seed: int, **extra: object) -> str:
        return client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=1.0,
                                         seed=seed, **extra).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert sample(7, stream=False, top_p=1.0) == first
    assert sample(8) != first
    assert sample(-7) == sample(-7)  # OpenAI's seeds are signed


def test_logprobs(server) -> None:
    client = server.client()
    whole = greedy(client, PROMPTS[0], 6, logprobs=1)
    lp = whole.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == 6 and all(v <= 0 for v in lp.token_logprobs)
    assert "".join(lp.tokens) == whole.choices[0].text
    chat = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=5, temperature=0, logprobs=True, top_logprobs=0)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(t.logprob <= 0 for t in content)
    assert greedy(client, PROMPTS[0], 6).choices[0].logprobs is None


def test_eight_concurrent_requests_batch_and_equal_each_alone(server, pipe) -> None:
    """8 concurrent mixed-length greedy requests (streamed and not) return exactly what
    pipeline.generate (what `mixport run` prints) returns for each prompt alone."""
    budgets = [6 + 5 * i for i in range(len(PROMPTS))]
    expected = [pipe.generate(p, max_new_tokens=n) for p, n in zip(PROMPTS, budgets, strict=True)]
    client = server.client()
    before = server.metric("mixport_batch_occupancy_ratio_bucket", le="0.125")
    before_count = server.metric("mixport_batch_occupancy_ratio_count")

    def ask(i: int) -> str:
        if i % 2:
            return "".join(c.choices[0].text for c in greedy(client, PROMPTS[i], budgets[i], stream=True))
        return greedy(client, PROMPTS[i], budgets[i]).choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(ask, range(len(PROMPTS))))
    assert got == expected
    one_row = server.metric("mixport_batch_occupancy_ratio_bucket", le="0.125") - before
    steps = server.metric("mixport_batch_occupancy_ratio_count") - before_count
    assert steps > one_row, "no decode step ran more than one row: the requests were not batched"


def eventually(read, expected: float) -> None:  # noqa: ANN001
    """The scheduler counts a finish just after it sends the last event: poll a moment for it."""
    deadline = time.monotonic() + 10
    while read() != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert read() == expected


def wait_idle(server) -> None:  # noqa: ANN001
    deadline = time.monotonic() + 10
    while server.get("/health").json()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.get("/health").json()["active"] == 0


def test_disconnect_frees_the_row(server) -> None:
    """A client leaving mid-stream, or a non-streaming one timing out, cancels its request
    (480 tokens would otherwise finish as "length")."""
    import openai

    client = server.client()
    cancelled = server.metric("mixport_requests_finished_total", reason="cancelled")
    stream = greedy(client, PROMPTS[0], 480, stream=True)
    for i, _chunk in enumerate(stream):
        if i == 2:
            break
    stream.close()  # the client goes away mid-stream
    wait_idle(server)
    eventually(lambda: server.metric("mixport_requests_finished_total", reason="cancelled"), cancelled + 1)
    with pytest.raises(openai.APITimeoutError):
        greedy(server.client(timeout=0.05), PROMPTS[0], 480)
    wait_idle(server)
    eventually(lambda: server.metric("mixport_requests_finished_total", reason="cancelled"), cancelled + 2)
    completion = server.metric("mixport_completion_tokens_total")
    assert greedy(client, PROMPTS[2], 3).usage.completion_tokens == 3  # the server goes on serving
    eventually(lambda: server.metric("mixport_completion_tokens_total"), completion + 3)


def error_of(exc_info: pytest.ExceptionInfo) -> dict:
    body = exc_info.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("fields, param, fragment", [
    ({"prompt": ""}, "prompt", "empty prompt"),
    ({"prompt": [7] * 600}, "prompt", "context is 512 tokens"),
    ({"prompt": "hi", "n": 2}, "n", "n=2"),
    ({"prompt": "hi", "temperature": -1}, "temperature", "greater than or equal to 0"),
    ({"prompt": "hi", "temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"prompt": ["one", "two"]}, "prompt", "one prompt per request"),
    ({"prompt": [99999]}, "prompt", "outside the vocabulary"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"prompt": "hi", "frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
])
def test_invalid_requests_are_400_with_openai_errors(server, fields: dict, param: str, fragment: str) -> None:
    import openai

    extra = dict(fields)
    prompt = extra.pop("prompt")
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().completions.create(model="tiny", prompt=prompt, max_tokens=4, extra_body=extra)
    error = error_of(caught)
    assert caught.value.status_code == 400 and error["param"] == param and fragment in error["message"], error


def test_bad_bodies_are_400_never_422_or_500(server) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        for content in (b"{not json", b"[1, 2]", b"", json.dumps({"messages": "x", "prompt": 3})):
            response = server.post(path, content)
            assert response.status_code == 400, (path, content, response.text)
            assert response.json()["error"]["type"] == "invalid_request_error"
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                logprobs=True, top_logprobs=3)
    assert error_of(caught)["param"] == "top_logprobs"


def test_unknown_fields_are_ignored_and_greedy_drops_sampling_fields(server, pipe) -> None:
    expected = pipe.generate(PROMPTS[3], max_new_tokens=5)
    got = greedy(server.client(), PROMPTS[3], 5, seed=3, top_p=0.5, user="me",
                 extra_body={"top_k": 4, "no_such_field": {"x": 1}, "another": [1, 2]})
    assert got.choices[0].text == expected


def test_models_health_and_metrics(server) -> None:
    assert greedy(server.client(), PROMPTS[0], 2).usage.completion_tokens == 2  # something to count
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = server.get("/health").json()
    assert health["status"] == "ok" and health["batched"] is True and health["max_batch"] == 8
    text = server.get("/metrics").text
    for series in ("mixport_requests_total", "mixport_prompt_tokens_total", "mixport_completion_tokens_total",
                   "mixport_queue_depth", "mixport_active_requests", "mixport_batch_occupancy",
                   "mixport_time_to_first_token_seconds_bucket", "mixport_inter_token_latency_seconds_bucket",
                   "mixport_step_seconds_bucket", "mixport_requests_finished_total"):
        assert f"\n{series}" in text, series
    assert server.metric("mixport_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert server.metric("mixport_time_to_first_token_seconds_count") >= 1
    assert server.get("/nope").json()["error"]["code"] == "not_found"


def test_port_in_use_is_one_line_error(server, serve_dir: Path) -> None:
    """uvicorn exits 3 when it cannot bind (mixport's parity-failure code): the CLI says it in one line, exit 1."""
    one_line_error(invoke("serve", serve_dir, "--port", server.port, "--threads", "1"),
                   f"cannot listen on 127.0.0.1:{server.port}", "--port 0")
