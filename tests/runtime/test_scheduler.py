"""Continuous batching (runtime/scheduler.py, rows.py): requests join and leave the running batch,
and each one gets exactly what it gets alone."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mixport.errors import RuntimeFailure
from mixport.runtime import load
from mixport.runtime.rows import SerialRows
from mixport.runtime.sampling import SamplingConfig
from mixport.runtime.scheduler import Closed, Job, QueueFull

PROMPTS = ["The ship sailed", "Once upon a time there was a", "A", "x y z",
           "Hello world, this is a much longer prompt about many things and then some more",
           "The cat", "In the beginning the", "Numbers 1 2 3 4 5 6"]


@pytest.fixture(scope="module")
def pipe(tiny_export: Path):
    with load(tiny_export, threads=1) as p:
        assert p.graph == "fast"
        yield p


@pytest.fixture(scope="module")
def alone(pipe) -> list[tuple[list[int], str]]:
    """Each prompt's greedy continuation generated alone (what `mixport run` prints)."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        ids = pipe.encode(prompt)
        new = pipe.generate_ids([ids], max_new_tokens=6 + 3 * i)[0]
        out.append((new, pipe.decode(new)))
    return out


def test_concurrent_mixed_lengths_equal_alone(pipe, alone) -> None:
    """8 threads submit mixed-length greedy requests at staggered times into 3 rows: rows join
    while others decode and leave at different steps; every result equals the request alone."""
    results: dict[int, tuple[str, list[int], str]] = {}
    with pipe.scheduler(max_batch=3, max_queue=8) as sched:
        assert sched.batched and sched.max_batch == 3

        def client(i: int) -> None:
            time.sleep(0.003 * i)
            results[i] = sched.submit(Job(pipe.encode(PROMPTS[i]), 6 + 3 * i)).result()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sched.active == 0 and sched.queue_depth == 0
    for i, (ids, text) in enumerate(alone):
        assert results[i][1] == ids, PROMPTS[i]
        assert results[i][0] == text
        assert results[i][2] in ("length", "stop")


def test_cancel_frees_the_row_within_one_step(pipe, alone) -> None:
    with pipe.scheduler(max_batch=1, max_queue=4) as sched:
        long = sched.submit(Job(pipe.encode(PROMPTS[0]), 200))
        waiting = sched.submit(Job(pipe.encode(PROMPTS[1]), 9))
        events = iter(long)
        assert next(events).finish is None
        long.cancel()
        buffered = long.pending  # made before the cancel, not consumed yet
        rest = list(events)
        assert rest[-1].finish == "cancelled"
        assert len(rest) <= buffered + 2  # at most the step in flight, then the cancellation
        text, ids, finish = waiting.result()  # the freed row went to the waiting request
        assert ids == alone[1][0]
        assert long.completion_tokens < 200


def test_full_queue_and_bad_jobs_are_refused(pipe) -> None:
    with pipe.scheduler(max_batch=1, max_queue=1) as sched:
        running = sched.submit(Job(pipe.encode(PROMPTS[0]), 300))
        next(iter(running))  # admitted: the row is taken
        queued = sched.submit(Job(pipe.encode(PROMPTS[1]), 4))
        with pytest.raises(QueueFull, match="queue is full") as info:
            sched.submit(Job(pipe.encode(PROMPTS[2]), 4))
        assert info.value.retry_after > 0
        with pytest.raises(RuntimeFailure, match="empty prompt"):
            sched.submit(Job([], 4))
        with pytest.raises(RuntimeFailure, match="longer than the model's context"):
            sched.submit(Job([5] * pipe.context, 4))
        with pytest.raises(RuntimeFailure, match="outside the vocabulary"):
            sched.submit(Job([pipe.vocab_size], 4))
        running.cancel()
        assert queued.result()[2] == "length"


def test_close_drains_then_refuses(pipe, alone) -> None:
    sched = pipe.scheduler(max_batch=2, max_queue=4)
    handles = [sched.submit(Job(pipe.encode(PROMPTS[i]), 6 + 3 * i)) for i in range(3)]
    assert sched.close(drain_timeout=None) is True
    assert [h.result()[1] for h in handles] == [alone[i][0] for i in range(3)]
    with pytest.raises(Closed):
        sched.submit(Job(pipe.encode(PROMPTS[0]), 4))
    # a drain that times out ends the rest with an error, and the pipeline is usable again
    sched = pipe.scheduler(max_batch=1, max_queue=4)
    long = sched.submit(Job(pipe.encode(PROMPTS[0]), 400))
    assert sched.close(drain_timeout=0.05) is False
    assert list(long)[-1].finish == "error"
    assert pipe.generate_ids([pipe.encode(PROMPTS[0])], 6)[0] == alone[0][0]


def test_seeded_sampling_does_not_depend_on_the_batch(pipe) -> None:
    cfg = SamplingConfig(temperature=1.0, top_k=40, seed=1234)
    job = Job(pipe.encode(PROMPTS[0]), 12, cfg)
    with pipe.scheduler(max_batch=4) as sched:
        solo = sched.submit(job).result()
        crowd = [sched.submit(Job(pipe.encode(p), 12, SamplingConfig(temperature=1.0, seed=i)))
                 for i, p in enumerate(PROMPTS[1:4])]
        again = sched.submit(job).result()
        other = sched.submit(Job(job.prompt, 12, SamplingConfig(temperature=1.0, top_k=40, seed=99))).result()
        for h in crowd:
            h.result()
    assert solo == again
    assert solo[1] != other[1]


def test_logprobs_are_the_models(pipe, tiny_export: Path) -> None:
    """The first token's logprob is log-softmax of model.onnx's own prefill logits at that token."""
    import onnxruntime as ort

    ids = pipe.encode(PROMPTS[4])
    with pipe.scheduler(max_batch=2) as sched:
        events = list(sched.submit(Job(ids, 5, logprobs=True)))
    first = events[0]
    sess = ort.InferenceSession(str(tiny_export / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64),
            "position_ids": np.arange(len(ids))[None]}
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values"):
            heads, width = inp.shape[1], inp.shape[3]
            feed[inp.name] = np.zeros((1, heads, 0, width), np.float32)
    logits = sess.run(["logits"], feed)[0][0, -1].astype(np.float64)
    expected = logits[first.token] - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    assert first.token == int(logits.argmax())
    assert first.logprob == pytest.approx(expected, abs=1e-4)
    assert all(e.logprob is not None and e.logprob <= 0 for e in events if e.token is not None)


def test_async_iteration(pipe, alone) -> None:
    async def main(sched) -> list[list[int]]:
        async def one(i: int) -> list[int]:
            return [e.token async for e in sched.submit(Job(pipe.encode(PROMPTS[i]), 6 + 3 * i))
                    if e.token is not None]
        return await asyncio.gather(*(one(i) for i in range(4)))

    with pipe.scheduler(max_batch=4) as sched:
        got = asyncio.run(main(sched))
    assert got == [alone[i][0] for i in range(4)]


def test_portable_graph_batches_too(tiny_export: Path, alone) -> None:
    """model.onnx (concatenating cache, left-padded rows): rows join and leave, results equal alone."""
    with load(tiny_export, threads=1, graph="portable") as p, p.scheduler(max_batch=3) as sched:
        assert sched.batched and sched.max_batch == 3
        handles = []
        for i in range(6):
            handles.append(sched.submit(Job(p.encode(PROMPTS[i]), 6 + 3 * i)))
            if i == 2:
                while handles[0].pending == 0:  # the first three run before the others arrive
                    time.sleep(0.001)
        assert [h.result()[1] for h in handles] == [alone[i][0] for i in range(6)]


def test_serial_rows_equal_generate(tiny_export: Path, alone) -> None:
    """SerialRows (TensorRT's path: one request at a time) over the portable session."""
    with load(tiny_export, threads=1, graph="portable") as p:
        rows = SerialRows(p.session)
        for i in (0, 4):
            (row,), logits = rows.prefill([p.encode(PROMPTS[i])])
            out = [int(logits[0].argmax())]
            while len(out) < len(alone[i][0]):
                out.append(int(rows.decode({row: out[-1]})[row].argmax()))
            rows.free(row)
            assert out == alone[i][0]


def test_close_twice_at_once(pipe, alone) -> None:
    """A drain in progress and a second close() with no patience: one release, both return."""
    sched = pipe.scheduler(max_batch=1)
    long = sched.submit(Job(pipe.encode(PROMPTS[0]), 300))
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(sched.close(drain_timeout=None)))
    waiter.start()
    time.sleep(0.05)
    assert sched.close(drain_timeout=0) is False
    waiter.join(30)
    assert results == [False] and list(long)[-1].finish == "error"
    assert long.completion_tokens >= 1
    assert pipe.generate_ids([pipe.encode(PROMPTS[0])], 6)[0] == alone[0][0]  # released exactly once
