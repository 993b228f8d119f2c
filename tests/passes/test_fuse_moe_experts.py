"""fuse_moe_experts: fires once per layer on exports and hand-built layers, never elsewhere, same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from mixport import artifact
from mixport.errors import PassError
from mixport.exporter.tiny import TINY
from mixport.passes import fuse_moe_experts, moe_bodies, run_pipeline
from mixport.tools.moe_layer import LayerSpec, dense_layer, swiglu_mlp

from .conftest import model_feed, moe_nodes, op_counts, ort_run, routers

LINEAR = {("", "Gemm"), ("", "MatMul")}


def _linears(model: onnx.ModelProto) -> int:
    return sum(c for key, c in op_counts(model).items() if key in LINEAR)


def _check_fused(unfused: onnx.ModelProto, fused: onnx.ModelProto, experts: int) -> None:
    layers = len(routers(unfused))
    assert layers and len(moe_nodes(fused)) == layers  # exactly one MoE per layer
    assert _linears(unfused) - _linears(fused) == 3 * experts * layers  # no per-expert Gemm/MatMul left
    assert not [t.name for t in fused.graph.initializer if ".experts." in t.name and t.name.endswith(".weight")]
    assert fused.ByteSize() <= unfused.ByteSize()


def test_fires_once_per_layer_on_tiny_export(tiny_unfused: onnx.ModelProto) -> None:
    fused, counts = run_pipeline(tiny_unfused)
    assert counts["fuse_moe_experts"] == TINY.num_hidden_layers
    _check_fused(tiny_unfused, fused, TINY.num_local_experts)
    onnx.checker.check_model(fused)


def test_stacked_weights_follow_the_op_contract(tiny_unfused: onnx.ModelProto) -> None:
    fused, _ = run_pipeline(tiny_unfused)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in fused.graph.initializer}
    old = {t.name: onnx.numpy_helper.to_array(t) for t in tiny_unfused.graph.initializer}
    moe = moe_nodes(fused)[0]
    gate_up, down = inits[moe.input[3]], inits[moe.input[4]]
    e, h, f = TINY.num_local_experts, TINY.hidden_size, TINY.intermediate_size
    assert gate_up.shape == (e, h, 2 * f) and down.shape == (e, f, h)
    prefix = "layers.0.block_sparse_moe.experts.3"
    np.testing.assert_array_equal(gate_up[3, :, :f], old[f"{prefix}.w1.weight"].T)
    np.testing.assert_array_equal(gate_up[3, :, f:], old[f"{prefix}.w3.weight"].T)
    np.testing.assert_array_equal(down[3], old[f"{prefix}.w2.weight"].T)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in moe.attribute}
    assert attrs == {"num_experts": e, "k": TINY.num_experts_per_tok, "activation": b"swiglu",
                     "plugin_namespace": b"mixport", "plugin_version": b"1"}


@pytest.mark.parametrize("name,experts", [("e4k1", 4), pytest.param("fp16", 8, marks=pytest.mark.slow),
                                          pytest.param("bf16", 4, marks=pytest.mark.slow)])
def test_fires_on_other_configs_and_dtypes(exports, name: str, experts: int) -> None:
    unfused = onnx.load(str(exports(name) / artifact.MODEL_FILE))
    fused, _ = run_pipeline(unfused)
    _check_fused(unfused, fused, experts)


@pytest.mark.parametrize("target", ["portable", "trt-noplugin", "ort"])
def test_same_outputs_as_unfused_export(tiny_unfused: onnx.ModelProto, target: str) -> None:
    fused, _ = run_pipeline(tiny_unfused, target=target)
    for seq in (1, 9):  # decode-like (one token per row) and prefill
        feed = model_feed(TINY.num_hidden_layers, seq)
        for a, b in zip(ort_run(tiny_unfused, feed), ort_run(fused, feed), strict=True):
            np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


def _routing(spec: LayerSpec, model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The experts each token picks, recomputed from the router weights."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    logits = x @ inits["gate.weight"].T + (np.array(spec.router_bias) if spec.router_bias else 0)
    return np.argsort(-logits, axis=1)[:, :spec.k]


SMALL = dict(hidden=32, inter=48, experts=8)
CASES = {  # name: (spec, tokens, experts that must get tokens (None: all))
    "every expert": (LayerSpec(**SMALL, k=2), 64, None),
    "k=1": (LayerSpec(**SMALL, k=1), 64, None),
    "two hot experts": (LayerSpec(**SMALL, k=2, router_bias=(0, 0, 50, 0, 0, 50, 0, 0)), 16, {2, 5}),
    "one token": (LayerSpec(**SMALL, k=2, router_bias=(0, 0, 50, 0, 0, 50, 0, 0)), 1, {2, 5}),
    "four experts": (LayerSpec(hidden=32, inter=48, experts=4, k=2), 32, None),
}


@pytest.mark.parametrize("target", ["portable", "portable/nonzero", "trt-noplugin", "ort"])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_outputs_match(case: str, target: str) -> None:
    spec, tokens, hot = CASES[case]
    dense = dense_layer(spec)
    fused, counts = run_pipeline(dense, target=target.split("/")[0])
    assert counts["fuse_moe_experts"] == 1
    if "/" in target:  # the alternative sparse body
        moe_bodies.attach(fused, target.split("/")[1])
    x = np.random.default_rng(1).standard_normal((tokens, spec.hidden)).astype(np.float32)
    used = set(_routing(spec, dense, x).ravel().tolist())
    assert used == (hot if hot is not None else set(range(spec.experts)))  # the case hits what it claims
    (want,), (got,) = ort_run(dense, {"hidden": x}), ort_run(fused, {"hidden": x})
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_does_not_fire_on_plain_swiglu_mlp() -> None:
    mlp = swiglu_mlp()
    graph = gs.import_onnx(mlp)
    reasons: list[str] = []
    assert fuse_moe_experts.apply(graph, reasons) == 0
    assert any("no mixport::TopKRouting" in r for r in reasons)
    out, counts = run_pipeline(mlp)  # nothing to fuse is not an error without routers
    assert counts["fuse_moe_experts"] == 0 and not moe_nodes(out)
    assert op_counts(out)[("", "Gemm")] == 3


def test_broken_pattern_says_why_and_pipeline_refuses() -> None:
    dense = dense_layer(LayerSpec(hidden=16, inter=24, experts=4, k=2))
    down = next(n for n in dense.graph.node if n.op_type == "Gemm" and n.input[1] == "experts.2.w2.weight")
    down.attribute.append(onnx.helper.make_attribute("alpha", 2.0))
    reasons: list[str] = []
    assert fuse_moe_experts.apply(gs.import_onnx(dense), reasons) == 0
    assert any("expert 2 down projection" in r and "alpha" in r for r in reasons)
    with pytest.raises(PassError, match="left 1 of 1 MoE layers unfused"):
        run_pipeline(dense)


def test_missing_expert_is_not_fused() -> None:
    dense = dense_layer(LayerSpec(hidden=16, inter=24, experts=4, k=2))
    eq = next(n for n in dense.graph.node if n.op_type == "Equal" and n.input[1] == "idx_3")
    eq.input[1] = "idx_2"  # expert 3's weight now reads expert 2's slot: not Mixtral's pattern
    reasons: list[str] = []
    assert fuse_moe_experts.apply(gs.import_onnx(dense), reasons) == 0
    assert any("do not cover 0..3" in r for r in reasons)
