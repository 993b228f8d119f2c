"""Backend choice for `mixport run` / `check`, and the CPU-side half of the TensorRT runner."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from mixport import artifact
from mixport.errors import RuntimeFailure
from mixport.runtime.select import choose_backend, tensorrt_unavailable
from mixport.runtime.trt_session import BindingPlan, torch_dtype_name
from tests.helpers import has_gpu, invoke, one_line_error, reexport_changed


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The no-GPU fallback, on every machine: where a GPU is visible, mixport is made not to see it."""
    if has_gpu():
        from mixport.engine import status

        monkeypatch.setattr(status, "visible_gpu", lambda: None)


@pytest.mark.usefixtures("no_gpu")
def test_run_falls_back_to_onnxruntime_and_says_why(engine_export: Path) -> None:
    res = invoke("run", engine_export, "--prompt", "The ship", "--max-new-tokens", "3")
    assert res.exit_code == 0, res.output
    assert ("[mixport] backend: onnxruntime (cpu, fast graph); TensorRT not used: model.engine is up to date "
            "but no CUDA GPU is visible") in res.output
    assert res.output.splitlines()[-1].startswith("The ship")


@pytest.mark.usefixtures("no_gpu")
def test_forced_tensorrt_is_refused_in_one_line(engine_export: Path) -> None:
    res = invoke("run", engine_export, "--prompt", "The ship", "--backend", "tensorrt")
    one_line_error(res, "cannot run with TensorRT: model.engine is up to date but no CUDA GPU")


def test_stale_engine_is_never_run(engine_copy: Path) -> None:
    reexport_changed(engine_copy)
    manifest = artifact.Manifest.read(engine_copy)
    choice = choose_backend(engine_copy, manifest, "auto")
    assert choice.backend == "onnxruntime"
    assert "model.engine is stale: model.onnx changed since the engine was built" in choice.reason
    with pytest.raises(RuntimeFailure, match="cannot run with TensorRT: model.engine is stale"):
        choose_backend(engine_copy, manifest, "tensorrt")
    res = invoke("run", engine_copy, "--prompt", "The ship", "--max-new-tokens", "2")
    assert res.exit_code == 0 and "TensorRT not used: model.engine is stale" in res.output, res.output


def test_folder_without_engine(export_copy: Path) -> None:
    manifest = artifact.Manifest.read(export_copy)
    assert tensorrt_unavailable(export_copy, manifest).startswith("the folder has no engine")
    assert choose_backend(export_copy, manifest, "onnxruntime").reason == "asked for with --backend onnxruntime"


@pytest.mark.usefixtures("no_gpu")
def test_check_says_why_tensorrt_was_not_compared(engine_export: Path) -> None:
    res = invoke("check", engine_export, "--steps", "1", "--reference", "mixport")
    assert res.exit_code == 0, res.output
    assert "[mixport] TensorRT not compared: model.engine is up to date but no CUDA GPU is visible" in res.output
    assert "pytorch-mixport vs onnxruntime," in res.output


def test_binding_plan_from_the_built_manifest(engine_export: Path) -> None:
    manifest = artifact.Manifest.read(engine_export)
    plan = BindingPlan.from_manifest(manifest)
    cfg, ranges = manifest.config, manifest.engine.ranges
    shapes = plan.input_shapes(2, 1, 7)
    assert shapes["attention_mask"] == (2, 8) and shapes["input_ids"] == (2, 1)
    assert shapes["past_key_values.1.value"] == (2, cfg["num_key_value_heads"], 7, cfg["head_dim"])
    assert set(shapes) == {i.name for i in manifest.inputs}  # every graph input is bound
    assert plan.present_names == [o.name for o in manifest.outputs if o.name.startswith("present")]
    assert plan.max_tokens() == ranges["past"][2] + ranges["seq"][2]
    plan.check(plan.input_shapes(1, 5, 0))  # prefill with an empty cache fits
    with pytest.raises(RuntimeFailure, match=r"input 'input_ids' is outside .* profile.*--batch MIN:OPT:MAX"):
        plan.check(plan.input_shapes(ranges["batch"][2] + 1, 1, 0))
    with pytest.raises(RuntimeFailure, match=r"past_key_values.0.key' is outside"):
        plan.check(plan.input_shapes(1, 1, ranges["past"][2] + 1))


def test_torch_dtypes_of_engine_tensors() -> None:
    import torch

    for trt_name in ("FLOAT", "HALF", "BF16", "INT64", "INT32", "BOOL"):
        assert isinstance(getattr(torch, torch_dtype_name(trt_name)), torch.dtype)
    with pytest.raises(RuntimeFailure, match="tensor type mixport cannot bind; given: FP8"):
        torch_dtype_name("FP8")


@pytest.mark.gpu
def test_tensorrt_generation_matches_onnxruntime(engine_export: Path, trt_module: ModuleType) -> None:
    from mixport.runtime import load

    prompts = [[1, 5, 9, 13, 200], [1, 7]]
    trt = load(engine_export, backend="tensorrt")
    ort = load(engine_export, backend="onnxruntime")
    assert trt.session.backend == "tensorrt"
    assert trt.generate_ids(prompts, 12) == ort.generate_ids(prompts, 12)
    trt.session.reset(1)
    logits = trt.session.step(np.array([[1, 5, 9]]), np.ones((1, 3), np.int64), np.arange(3)[None])
    ort.session.reset(1)
    ref = ort.session.step(np.array([[1, 5, 9]]), np.ones((1, 3), np.int64), np.arange(3)[None])
    np.testing.assert_allclose(logits, ref, atol=1e-3, rtol=1e-3)
    assert trt.session.past_len == 3 and trt.session.past[0].is_cuda


@pytest.mark.gpu
def test_check_compares_tensorrt(engine_export: Path, trt_module: ModuleType) -> None:
    res = invoke("check", engine_export, "--steps", "2", "--reference", "mixport")
    assert res.exit_code == 0, res.output
    assert "vs onnxruntime and tensorrt" in res.output and "logits [tensorrt]" in res.output
