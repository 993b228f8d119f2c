"""Generation through both ONNX Runtime graphs against mixport's PyTorch reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mixport.exporter.loader import load_reference
from mixport.runtime import SamplingConfig, load
from mixport.runtime.api import Pipeline
from tests.helpers import require_module

GRAPHS = ("fast", "portable")
PROMPT = "The ship sailed north, the wind"


def reference_greedy(source: Path, prompt: list[int], steps: int, eos: tuple[int, ...]) -> list[int]:
    """Greedy continuation from the PyTorch reference with its KV cache (stops after EOS)."""
    model, _, _ = load_reference(source)
    ids = torch.tensor([prompt])
    past = model.empty_past(1)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            total = past[0].shape[2] + ids.shape[1]
            pos = torch.arange(total - ids.shape[1], total)[None]
            logits, past = model(ids, torch.ones(1, total, dtype=torch.int64), pos, past)
            token = int(logits[0, -1].argmax())
            out.append(token)
            if token in eos:
                break
            ids = torch.tensor([[token]])
    return out


@pytest.fixture(scope="module")
def reference_64(pipes: dict[str, Pipeline], rt_source: Path) -> list[int]:
    pipe = pipes["portable"]
    return reference_greedy(rt_source, pipe.encode(PROMPT), 64, pipe.eos_ids())


@pytest.mark.parametrize("graph", GRAPHS)
def test_greedy_matches_pytorch_reference_for_64_tokens(pipes: dict[str, Pipeline], reference_64: list[int],
                                                        graph: str) -> None:
    pipe = pipes[graph]
    got = pipe.generate_ids([pipe.encode(PROMPT)], 64)[0]
    want = reference_64
    assert got == want
    assert len(got) >= 16  # a test that stops at once would prove little


def test_fast_and_portable_graphs_give_the_same_logits(pipes: dict[str, Pipeline]) -> None:
    prompts = [pipes["fast"].encode(PROMPT), pipes["fast"].encode("A router")]
    from mixport.runtime.generate import left_pad

    ids, mask, pos = left_pad(prompts, 0)
    out = {}
    for g, pipe in pipes.items():
        pipe.session.reset(2)
        out[g] = pipe.session.step(ids, mask, pos)  # [B, S, V], left-padded layout
    real = mask.astype(bool)
    np.testing.assert_allclose(out["fast"][real], out["portable"][real], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("graph", GRAPHS)
def test_batch_rows_equal_single_prompts(pipes: dict[str, Pipeline], graph: str) -> None:
    pipe = pipes[graph]
    texts = ["The ship", "A router scores the experts, keeps", "Parity is"]  # different lengths
    batch = pipe.generate(texts, 24)
    assert batch == [pipe.generate(t, 24) for t in texts]


def test_cache_grows_past_its_first_capacity(pipes: dict[str, Pipeline]) -> None:
    """Without reserve() the fast session doubles its cache; logits stay the portable ones."""
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, 500, (1, 250))
    logits = {}
    for g, pipe in pipes.items():
        s = pipe.session
        s.reset(1)
        s.step(prompt, np.ones((1, 250), np.int64), np.arange(250)[None])
        steps = [s.step(np.array([[7 + i]]), np.ones((1, 251 + i), np.int64), np.array([[250 + i]]))[:, -1]
                 for i in range(12)]
        logits[g] = np.concatenate(steps)
    assert pipes["fast"].session.capacity >= 262
    np.testing.assert_allclose(logits["fast"], logits["portable"], atol=1e-4, rtol=1e-3)


def test_seeded_sampling_is_deterministic(pipes: dict[str, Pipeline]) -> None:
    pipe = pipes["fast"]
    kw = dict(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.1)
    a = pipe.generate(PROMPT, 24, seed=7, **kw)
    assert a == pipe.generate(PROMPT, 24, seed=7, **kw)
    others = {pipe.generate(PROMPT, 24, seed=s, **kw) for s in (8, 9, 10)}
    assert others - {a}, "different seeds should give some different text"


def test_top_k_1_sampling_is_greedy(pipes: dict[str, Pipeline]) -> None:
    pipe = pipes["fast"]
    assert pipe.generate(PROMPT, 16, temperature=0.7, top_k=1, seed=3) == pipe.generate(PROMPT, 16)


def test_stop_string_cuts_and_stops(pipes: dict[str, Pipeline]) -> None:
    pipe = pipes["fast"]
    full_ids = pipe.generate_ids([pipe.encode(PROMPT)], 32)[0]
    full = pipe.decode(full_ids)
    stop = full[len(full) // 3: len(full) // 3 + 3]
    assert stop and stop in full
    cut = pipe.generate(PROMPT, 32, stop=[stop])
    assert cut == full.split(stop)[0]
    ids = pipe.generate_ids([pipe.encode(PROMPT)], 32, stop=[stop])[0]
    assert len(ids) < len(full_ids)


@pytest.mark.parametrize("sampling", [{}, dict(temperature=1.0, top_k=50, top_p=0.95, seed=8)],
                         ids=["greedy", "seeded"])
def test_stream_yields_the_generated_text_as_it_is_made(pipes: dict[str, Pipeline], sampling: dict) -> None:
    pipe = pipes["fast"]
    prompt = pipe.encode(PROMPT)
    new = pipe.generate_ids([prompt], 24, SamplingConfig(**sampling))[0]
    assert len(new) >= 8, new  # enough tokens for "before the end" to mean something
    stream = pipe.stream(PROMPT, 24, **sampling)
    first = next(stream)
    # The first piece arrives while tokens are still to come (a full run ends at prompt + new - 1).
    assert pipe.session.past_len < len(prompt) + len(new) - 1
    pieces = [first, *stream]
    assert len(pieces) > 1
    assert "".join(pieces) == pipe.decode(new) == pipe.generate(PROMPT, 24, **sampling)


def test_stream_stops_where_generate_stops(pipes: dict[str, Pipeline]) -> None:
    pipe = pipes["fast"]
    full = pipe.generate(PROMPT, 24)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert len(stop) == 2
    text = "".join(pipe.stream(PROMPT, 24, stop=[stop]))
    assert text == pipe.generate(PROMPT, 24, stop=[stop]) == full.split(stop)[0]
    assert stop not in text and len(text) < len(full)


def test_chat_prompt_is_the_rendered_template(rt_export: Path, pipes: dict[str, Pipeline]) -> None:
    """--chat: transformers renders the folder's template; mixport's ids are that text tokenized, once."""
    transformers = require_module("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(rt_export)
    rendered = hf.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                      tokenize=False)
    assert rendered == "<s>[INST] hello [/INST]"
    want = list(hf(rendered, add_special_tokens=False)["input_ids"])
    pipe = pipes["fast"]
    ids = pipe.encode("hello", chat=True)
    assert ids == want and ids.count(pipe.tokenizer.bos_id) == 1 and ids[0] == pipe.tokenizer.bos_id
    assert ids != pipe.encode("hello")
    chat = pipe.generate("hello", max_new_tokens=4, chat=True)
    assert chat == pipe.decode(pipe.generate_ids([want], 4)[0]) and chat


def test_python_api(rt_export: Path) -> None:
    with load(rt_export, threads=1) as pipe:
        assert pipe.session.graph == "fast"
        text = pipe.generate("Once upon a time", max_new_tokens=8)
        assert text == pipe.decode(pipe.generate_ids([pipe.encode("Once upon a time")], 8)[0]) and text
        assert pipe.generate(["Once upon a time"], max_new_tokens=8) == [text]
    assert SamplingConfig().greedy


def test_fast_graph_is_recorded_in_the_manifest(rt_export: Path) -> None:
    import json

    from mixport.artifact import file_sha256

    load(rt_export, threads=1, graph="fast").close()
    manifest = json.loads((rt_export / "manifest.json").read_text())
    rec = manifest["ort_graph"]
    assert rec["signature"] == "ort-cpu-gqa-v1"
    assert rec["sha256"] == file_sha256(rt_export / rec["file"])
    assert rec["source_onnx_sha256"] == manifest["onnx_sha256"]


@pytest.mark.parametrize("graph", GRAPHS)
def test_batch_stops_each_row_on_its_own(pipes: dict[str, Pipeline], graph: str) -> None:
    pipe = pipes[graph]
    texts = ["The ship", "A router scores the experts, keeps"]
    first = pipe.generate(texts[0], 24)
    stop = [first[len(texts[0]) + 4: len(texts[0]) + 6]]  # a string only row 0 is sure to produce
    batch = pipe.generate(texts, 24, stop=stop)
    assert batch == [pipe.generate(t, 24, stop=stop) for t in texts]
    assert len(batch[0]) < len(first)


def test_fast_graph_in_fp16_agrees_with_fp32(rt_export: Path, pipes: dict[str, Pipeline], tmp_path: Path) -> None:
    from dataclasses import replace

    import onnx

    from mixport.artifact import Manifest
    from mixport.runtime import ort_graph
    from mixport.runtime.ort_fast import OrtFastSession

    manifest = Manifest.read(rt_export)
    proto = ort_graph.build(ort_graph.export_weights(rt_export / "model.onnx"), manifest.config, "fp16")
    onnx.save_model(proto, str(tmp_path / "fp16.onnx"))
    half = OrtFastSession(tmp_path / "fp16.onnx", replace(manifest, dtype="fp16"), threads=1)
    ids = np.array([pipes["fast"].encode(PROMPT)])
    mask, pos = np.ones_like(ids), np.arange(ids.shape[1])[None]
    half.reset(1)
    full = pipes["fast"].session
    full.reset(1)
    got = half.step(ids, mask, pos).astype(np.float32)
    want = full.step(ids, mask, pos)
    np.testing.assert_allclose(got, want, atol=5e-2, rtol=5e-2)
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_stop_checker_window_finds_the_first_match_as_a_full_decode_does(pipes: dict[str, Pipeline]) -> None:
    """The stop check decodes only the last tokens; called after each token it must fire at the
    same token as checking the whole decoded text would."""
    from mixport.runtime.streaming import stop_checker

    pipe = pipes["fast"]
    ids = pipe.generate_ids([pipe.encode(PROMPT)], 64)[0]
    text = pipe.decode(ids)
    stops = [text[i: i + n] for i, n in ((len(text) // 5, 1), (len(text) // 3, 3), (len(text) // 2, 6),
                                         (len(text) - 8, 8))] + ["not in the text"]
    decode = pipe.tokenizer.decode
    for stop in stops:
        check = stop_checker(decode, [stop])
        first_window = next((n for n in range(1, len(ids) + 1) if check(0, ids[:n])), None)
        first_full = next((n for n in range(1, len(ids) + 1) if stop in decode(ids[:n])), None)
        assert first_window == first_full, (stop, first_window, first_full)
        assert (first_full is None) == (stop not in text)


def test_text_stream_incremental_equals_full_decode(pipes: dict[str, Pipeline]) -> None:
    """Pieces pushed token by token join to the full decode, for long sequences of any ids
    (partial byte tokens included), with and without stop strings, and never decode the whole
    text per token."""
    from mixport.runtime.streaming import TextStream, cut_at_stops

    decode = pipes["fast"].tokenizer.decode
    rng = np.random.default_rng(0)
    vocab = pipes["fast"].tokenizer.tok.get_vocab_size()
    for trial in range(4):
        ids = rng.integers(3, vocab, 300).tolist()
        full = decode(ids)
        for stop in (None, [full[150:153]]):
            calls: list[int] = []

            def counted(x: list[int], calls: list[int] = calls) -> str:
                calls.append(len(x))
                return decode(x)

            stream = TextStream(counted, stop)
            pieces = []
            for token in ids:
                pieces.append(stream.push(token))
                if stream.stopped:
                    break
            pieces.append(stream.flush())
            assert "".join(pieces) == cut_at_stops(full if not stream.stopped else decode(stream.ids), stop)
            if stop:
                assert stream.stopped and "".join(pieces) == full.split(stop[0])[0], trial
            assert max(calls[:-1]) < 50, "push decoded a long prefix"
