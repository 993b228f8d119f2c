"""Bad option values: a usage error (exit 2, click's message naming the option and the value) on the
command line, one RuntimeFailure line naming the setting and the value in the Python API; sampling
options without --temperature are refused, never silently ignored; a missing CUDA provider is one
cause with one hint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mixport.errors import RuntimeFailure
from mixport.runtime.api import Pipeline
from tests.helpers import invoke, one_line_error

PROMPT = "The ship sailed"
HUGE_SEED = str(2**64)


@pytest.mark.parametrize(("args", "fragment"), [
    (["--temperature", "nan"], "Invalid value for '--temperature': 'nan' is not a finite number"),
    (["--temperature", "inf"], "Invalid value for '--temperature': 'inf' is not a finite number"),
    (["--temperature", "-1"], "Invalid value for '--temperature': -1.0 is not in the range x>=0"),
    (["--top-p", "0", "--temperature", "1"], "Invalid value for '--top-p': 0.0 is not in the range 0<x<=1"),
    (["--top-p", "1.5", "--temperature", "1"], "Invalid value for '--top-p': 1.5 is not in the range 0<x<=1"),
    (["--top-p", "nan", "--temperature", "1"], "Invalid value for '--top-p': 'nan' is not a finite number"),
    (["--top-k", "-1", "--temperature", "1"], "Invalid value for '--top-k': -1 is not in the range x>=0"),
    (["--repetition-penalty", "0"], "Invalid value for '--repetition-penalty': 0.0 is not in the range x>0"),
    (["--repetition-penalty", "nan"], "Invalid value for '--repetition-penalty': 'nan' is not a finite number"),
    (["--seed", "-1", "--temperature", "1"], "Invalid value for '--seed': -1 is not in the range 0<=x<="),
    (["--seed", HUGE_SEED, "--temperature", "1"], f"Invalid value for '--seed': {HUGE_SEED} is not in the range"),
    (["--stop", ""], "Invalid value for '--stop': an empty string is not allowed"),
    (["--max-new-tokens", "0"], "Invalid value for '--max-new-tokens': 0 is not in the range x>=1"),
    (["--max-new-tokens", "-1"], "Invalid value for '--max-new-tokens': -1 is not in the range x>=1"),
    (["--threads", "0"], "Invalid value for '--threads': 0 is not in the range 1<=x<="),
    (["--threads", "100000"], "Invalid value for '--threads': 100000 is not in the range 1<=x<="),
    (["--top-k", "40"], "--top-k 40 only applies when sampling: add --temperature > 0"),
    (["--top-p", "0.9"], "--top-p 0.9 only applies when sampling"),
    (["--seed", "7", "--top-k", "3"], "--top-k 3, --seed 7 only apply when sampling"),
    (["--seed", "7", "--temperature", "0"], "--seed 7 only applies when sampling"),
])
def test_bad_run_options_are_usage_errors(args: list[str], fragment: str, rt_export: Path) -> None:
    res = invoke("run", rt_export, "--prompt", PROMPT, *args)
    assert res.exit_code == 2, res.output
    assert "Usage: main run [OPTIONS]" in res.output and fragment in res.output, res.output
    assert "Traceback" not in res.output and "SamplingConfig" not in res.output
    assert not [ln for ln in res.output.splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize(("args", "fragment"), [
    (["--threads", "100000"], "Invalid value for '--threads': 100000 is not in the range 1<=x<="),
    (["--threads", "-1"], "Invalid value for '--threads': -1 is not in the range 1<=x<="),
    (["--batch", "-3"], "Invalid value for '--batch': -3 is not in the range x>=1"),
])
def test_bad_bench_options_are_usage_errors(args: list[str], fragment: str, tmp_path: Path) -> None:
    res = invoke("bench", tmp_path, *args)
    assert res.exit_code == 2, res.output
    assert "Usage: main bench [OPTIONS]" in res.output and fragment in res.output, res.output


def test_the_thread_cap_follows_the_machine() -> None:
    import os

    from mixport.runtime.ort_session import max_threads

    assert max_threads() == 4 * len(os.sched_getaffinity(0))
    res = invoke("run", "nowhere", "--prompt", "x", "--threads", max_threads() + 1)
    assert res.exit_code == 2 and f"1<=x<={max_threads()}" in res.output, res.output


def test_bench_refuses_a_batch_that_cannot_fit_before_loading(rt_export: Path, monkeypatch) -> None:  # noqa: ANN001
    from mixport.tools import bench

    monkeypatch.setattr(bench, "available_mb", lambda: 1.0)
    monkeypatch.setattr("mixport.runtime.load", lambda *a, **k: pytest.fail("loaded before refusing"))
    one_line_error(invoke("bench", rt_export, "--batch", "100000", "--new-tokens", "2"),
                   "the batch does not fit in memory", "--batch 100000", "MB available")
    one_line_error(invoke("bench", rt_export, "--prompt-len", "600"), "exceed the model's context",
                   "--prompt-len 600")


def test_sampling_with_temperature_runs(rt_export: Path) -> None:
    res = invoke("run", rt_export, "--prompt", PROMPT, "--max-new-tokens", "3", "--temperature", "0.8",
                 "--top-k", "5", "--top-p", "0.9", "--seed", "7", "--stop", "zz", "--threads", "1")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(("options", "name", "value"), [
    (dict(temperature=math.nan), "temperature", "nan"),
    (dict(temperature=math.inf), "temperature", "inf"),
    (dict(temperature=-1.0), "temperature", "-1.0"),
    (dict(temperature=True), "temperature", "True"),
    (dict(temperature="hot"), "temperature", "'hot'"),
    (dict(temperature=1.0, top_p=0.0), "top_p", "0.0"),
    (dict(temperature=1.0, top_p=1.5), "top_p", "1.5"),
    (dict(temperature=1.0, top_p=math.nan), "top_p", "nan"),
    (dict(temperature=1.0, top_k=-1), "top_k", "-1"),
    (dict(temperature=1.0, top_k=2.5), "top_k", "2.5"),
    (dict(repetition_penalty=0.0), "repetition_penalty", "0.0"),
    (dict(repetition_penalty=math.inf), "repetition_penalty", "inf"),
    (dict(temperature=1.0, seed=-1), "seed", "-1"),
    (dict(temperature=1.0, seed=2**64), "seed", str(2**64)),
])
def test_bad_sampling_values_name_the_setting_and_value(pipes: dict[str, Pipeline], options: dict,
                                                        name: str, value: str) -> None:
    with pytest.raises(RuntimeFailure) as err:
        pipes["fast"].generate(PROMPT, 4, **options)
    msg = str(err.value)
    assert msg.startswith(f"invalid sampling setting {name}; given: {value};"), msg
    assert "SamplingConfig" not in msg and "\n" not in msg
    with pytest.raises(RuntimeFailure, match=f"invalid sampling setting {name}"):
        next(pipes["fast"].stream(PROMPT, 4, **options))


@pytest.mark.parametrize("options", [dict(top_k=40), dict(top_p=0.9), dict(seed=7), dict(temperature=0, seed=7)])
def test_sampling_options_without_temperature_are_refused(pipes: dict[str, Pipeline], options: dict) -> None:
    with pytest.raises(RuntimeFailure, match="only applies when sampling; given: temperature=0") as err:
        pipes["portable"].generate(PROMPT, 4, **options)
    assert "SamplingConfig" not in str(err.value)


@pytest.mark.parametrize(("call", "fragment"), [
    (lambda p: p.generate(PROMPT, 4, stop=[""]), "invalid stop string; given: ''"),
    (lambda p: p.generate(PROMPT, 4, stop=[3]), "invalid stop string; given: 3"),
    (lambda p: "".join(p.stream(PROMPT, 4, stop=["ok", ""])), "invalid stop string"),
    (lambda p: p.generate(PROMPT, 0), "max_new_tokens must be a positive integer; given: 0"),
    (lambda p: p.generate(PROMPT, -1), "max_new_tokens must be a positive integer; given: -1"),
    (lambda p: p.generate(PROMPT, "8"), "max_new_tokens must be a positive integer; given: '8'"),
    (lambda p: p.generate(PROMPT, 4, temprature=1.0), "unknown sampling option; given: temprature"),
])
def test_bad_request_values_are_one_line(pipes: dict[str, Pipeline], call: object, fragment: str) -> None:
    with pytest.raises(RuntimeFailure) as err:
        call(pipes["fast"])  # type: ignore[operator]
    assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_one_stop_string_may_be_given_alone(pipes: dict[str, Pipeline]) -> None:
    pipe = pipes["fast"]
    assert pipe.generate(PROMPT, 12, stop="e") == pipe.generate(PROMPT, 12, stop=["e"])


@pytest.mark.parametrize("threads", [100000, -1, 2.5, True])
def test_load_refuses_a_thread_count_before_reading_the_folder(threads: object, tmp_path: Path) -> None:
    from mixport.runtime import load

    with pytest.raises(RuntimeFailure, match="invalid thread count") as err:
        load(tmp_path / "missing", threads=threads)  # type: ignore[arg-type]
    assert "expected: 1 to " in str(err.value)


def test_cuda_without_its_provider_is_one_cause_and_one_hint(rt_export: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider")
    for graph in ("auto", "portable"):
        line = one_line_error(invoke("run", rt_export, "--prompt", PROMPT, "--device", "cuda", "--graph", graph),
                              "ONNX Runtime has no CUDA provider here", "given: --device cuda",
                              "hint: pip install", "or use --device cpu")
        assert line.startswith("error: ONNX Runtime has no CUDA provider here;"), line
        assert line.count("given:") == line.count("expected:") == line.count("hint:") == 1, line
        assert "could not load the model" not in line and "model.onnx" not in line, line
