"""The fast ONNX Runtime graph builds from every weight of an export, or refuses it with a reason.

It is derived from the family's adapter; a weight it would not use (a shared expert, a bias,
an extra expert) must never vanish silently: `ensure` / `build` raise, and `--graph auto`
falls back to model.onnx saying why.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mixport import artifact
from mixport.errors import RuntimeFailure
from mixport.models import Adapter, registry
from mixport.runtime import load, ort_emit, ort_graph
from mixport.runtime.ort_fast import OrtFastSession
from mixport.runtime.ort_session import OrtSession


def _manifest(folder: Path) -> artifact.Manifest:
    return artifact.Manifest.read(folder)


def _logits(model_path: Path, manifest: artifact.Manifest, ids: np.ndarray) -> np.ndarray:
    session = OrtFastSession(model_path, manifest, threads=1)
    session.reset(1)
    out = session.step(ids, np.ones_like(ids), np.arange(ids.shape[1])[None])
    session.close()
    return out


def test_fused_and_unfused_exports_build_the_same_fast_graph(rt_export: Path, tiny_export: Path,
                                                             tmp_path: Path) -> None:
    """Both layouts of the same weights (seed 0): every weight used, identical logits. The fused
    export also holds the passes' folded constants (scalars, shape vectors), which are not weights."""
    manifest = _manifest(rt_export)
    assert manifest.config["model_type"] == "mixtral"  # what export records for the adapter
    ids = np.array([[5, 17, 42, 7, 99, 3]], dtype=np.int64)
    logits = []
    for folder in (rt_export, tiny_export):
        weights = ort_graph.export_weights(folder / artifact.MODEL_FILE, _manifest(folder).config)
        if folder == tiny_export:
            assert any(not ort_emit.is_weight(n, v) for n, v in weights.items())  # val_* constants
        path = tmp_path / f"{folder.name}-{len(logits)}.onnx"
        onnx.save_model(ort_graph.build(weights, manifest.config, "fp32"), str(path))
        logits.append(_logits(path, manifest, ids))
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-5, rtol=1e-5)


def _add_initializer(folder: Path, name: str, value: np.ndarray) -> None:
    """model.onnx gains a weight (the manifest is updated: the export is taken to hold it)."""
    path = folder / artifact.MODEL_FILE
    proto = onnx.load(str(path))
    proto.graph.initializer.append(numpy_helper.from_array(value, name))
    onnx.save_model(proto, str(path))
    dataclasses.replace(_manifest(folder), onnx_sha256=artifact.file_sha256(path)).write(folder)


H, F = 64, 96  # the tiny config's hidden and expert sizes
UNKNOWN = {
    "shared-expert": ("layers.0.block_sparse_moe.shared_expert.gate_proj.weight", np.ones((F, H), np.float32)),
    "extra-expert": ("layers.1.block_sparse_moe.experts.8.w1.weight", np.ones((F, H), np.float32)),
    "scalar-parameter": ("layers.0.block_sparse_moe.shared_expert_gate.scale", np.array(2.0, np.float32)),
    "unnamed-tensor": ("val_9999", np.ones((4, H), np.float32)),
}


@pytest.mark.parametrize("case", list(UNKNOWN))
def test_a_weight_the_fast_graph_would_not_use_is_refused(rt_copy: Path, case: str) -> None:
    name, value = UNKNOWN[case]
    _add_initializer(rt_copy, name, value)
    with pytest.raises(RuntimeFailure, match=f"does not understand every weight.*1 unused: {name}"):
        ort_graph.ensure(rt_copy, _manifest(rt_copy))
    with pytest.raises(RuntimeFailure, match=name):
        load(rt_copy, threads=1, graph="fast")
    said: list[str] = []
    with load(rt_copy, threads=1, graph="auto", progress=said.append) as pipe:  # falls back, with the reason
        assert isinstance(pipe.session, OrtSession)
    assert any("fast graph unavailable" in s and name in s for s in said), said


def test_constants_of_the_traced_graph_are_not_weights(rt_copy: Path) -> None:
    """A scalar or an int64 shape vector is re-expressed by the fast graph, not a weight to use."""
    _add_initializer(rt_copy, "val_9998", np.array(0.5, np.float32))
    _add_initializer(rt_copy, "val_9999", np.array([-1, H], np.int64))
    assert ort_graph.ensure(rt_copy, _manifest(rt_copy)).is_file()


def test_rotary_frequencies_must_be_the_configs(rt_export: Path) -> None:
    cfg = _manifest(rt_export).config
    weights = ort_graph.export_weights(rt_export / artifact.MODEL_FILE, cfg)
    with pytest.raises(RuntimeFailure, match="inv_freq"):
        ort_graph.build(weights, {**cfg, "rope_theta": cfg["rope_theta"] * 2}, "fp32")


def test_a_missing_weight_is_refused(rt_export: Path) -> None:
    cfg = _manifest(rt_export).config
    weights = ort_graph.export_weights(rt_export / artifact.MODEL_FILE, cfg)
    del weights["layers.1.block_sparse_moe.experts.3.w2.weight"]
    with pytest.raises(RuntimeFailure, match="missing.*experts.3.w2"):
        ort_graph.build(weights, cfg, "fp32")


class _NewFamily(Adapter):
    model_type = "new_moe"
    architectures = ("NewMoeForCausalLM",)
    hf_class = "NewMoeForCausalLM"  # fast_graph stays False: the fast graph has not learned it


def test_supported_asks_the_adapter_and_the_config(rt_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _manifest(rt_export).config
    assert ort_graph.supported(cfg, "fp32") is None
    old = {k: v for k, v in cfg.items() if k != "model_type"}  # a manifest from before the adapters
    assert ort_graph.supported(old, "fp32") is None
    why = ort_graph.supported({**cfg, "model_type": "nope_moe"}, "fp32")
    assert "nope_moe" in why and "MixtralForCausalLM" in why
    monkeypatch.setattr(registry, "ADAPTERS", (*registry.ADAPTERS, _NewFamily()))
    assert "NewMoeForCausalLM" in ort_graph.supported({**cfg, "model_type": "new_moe"}, "fp32")
    # a config field the fast graph does not build (a newer family's), unless at its neutral default
    assert "attn_logit_softcapping=30.0" in ort_graph.supported({**cfg, "attn_logit_softcapping": 30.0}, "fp32")
    monkeypatch.setattr(ort_graph, "FIELDS", ort_graph.FIELDS - {"shared_expert_intermediate_size", "dense_layers"})
    assert "shared_expert_intermediate_size=64" in ort_graph.supported(
        {**cfg, "shared_expert_intermediate_size": 64}, "fp32")
    assert ort_graph.supported({**cfg, "shared_expert_intermediate_size": 0}, "fp32") is None
    assert ort_graph.supported({**cfg, "dense_layers": []}, "fp32") is None  # JSON's list of the default ()
    assert "dense_layers=[1]" in ort_graph.supported({**cfg, "dense_layers": [1]}, "fp32")
    assert ort_graph.supported({**cfg, "normalization": "none"}, "fp32") is None
    assert ort_graph.supported({**cfg, "sliding_window": 4}, "fp32") is None  # GQA's local_window_size
    assert "head_dim 24" in ort_graph.supported({**cfg, "head_dim": 24}, "fp32")  # see test_gqa_contract.py
    assert "bf16" in ort_graph.supported(cfg, "bf16")
    assert ort_graph.supported({**cfg, "rope_type": "yarn", "rope_factor": 4.0}, "fp32") is None  # scaled cos/sin
    assert "rope_type longrope" in ort_graph.supported({**cfg, "rope_type": "longrope"}, "fp32")
