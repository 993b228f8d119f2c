"""fold_constants, remove_dead and lower_ort_moe: each fires where it should, says why where not."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from mixport import ops
from mixport.passes import fold_constants, lower_ort_moe, remove_dead, run_pipeline
from mixport.tools.moe_layer import LayerSpec, dense_layer, swiglu_mlp

from .conftest import moe_nodes, op_counts, ort_run


def test_fold_constants_removes_constant_nodes(tiny_unfused: onnx.ModelProto) -> None:
    graph = gs.import_onnx(tiny_unfused)
    assert fold_constants.apply(graph, []) > 0
    assert not [n for n in graph.nodes if n.op == "Constant"]


def test_fold_constants_nothing_to_fold() -> None:
    reasons: list[str] = []
    assert fold_constants.apply(gs.import_onnx(swiglu_mlp()), reasons) == 0
    assert reasons == ["fold_constants: nothing constant to fold"]


def test_remove_dead_drops_unused_node_and_initializer() -> None:
    model = swiglu_mlp()
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((3,), np.float32), "unused_w"))
    model.graph.node.append(onnx.helper.make_node("Relu", ["g"], ["dead"]))
    graph = gs.import_onnx(model)
    assert remove_dead.apply(graph, []) == 1  # the Relu (graphsurgeon never imports unused initializers)
    reasons: list[str] = []
    assert remove_dead.apply(graph, reasons) == 0 and reasons
    out, _ = run_pipeline(model)
    assert {t.name for t in out.graph.initializer} == {"w1", "w2", "w3"}
    assert op_counts(out)[("", "Relu")] == 0


def test_lower_ort_moe_fires_and_matches() -> None:
    dense = dense_layer(LayerSpec(hidden=32, inter=48, experts=4, k=2))
    lowered, counts = run_pipeline(dense, target="ort")
    assert counts["lower_ort_moe"] == 1 and not moe_nodes(lowered)
    assert op_counts(lowered)[("com.microsoft", "MoE")] == 1
    x = np.random.default_rng(0).standard_normal((20, 32)).astype(np.float32)
    np.testing.assert_allclose(ort_run(lowered, {"hidden": x})[0], ort_run(dense, {"hidden": x})[0],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("order", "normalization", "normalize"), [
    ("softmax_topk", "renormalize", 1), ("softmax_topk", "none", 0),
    ("topk_softmax", "none", 1), ("topk_softmax", "renormalize", 1)])
def test_lower_ort_moe_each_routing_mode(order: str, normalization: str, normalize: int) -> None:
    """Every TopKRouting mode is lowered; ORT's com.microsoft.MoE equals the function bodies (the unlowered
    graph in ORT) and the float64 oracle. topk_softmax rides on softmax -> top-k -> renormalize (equal
    mathematically); softmax_topk + none on normalize_routing_weights=0."""
    from mixport.plugins.kernels.reference import reference_moe, reference_routing

    spec = LayerSpec(hidden=32, inter=48, experts=8, k=3, normalization=normalization, order=order)
    dense = dense_layer(spec)
    lowered, counts = run_pipeline(dense, target="ort")
    assert counts["lower_ort_moe"] == 1 and not moe_nodes(lowered)
    (node,) = [n for n in lowered.graph.node if n.domain == "com.microsoft"]
    assert onnx.helper.get_attribute_value(next(a for a in node.attribute
                                                if a.name == "normalize_routing_weights")) == normalize
    x = np.random.default_rng(1).standard_normal((40, 32)).astype(np.float32) * 2
    got, body = ort_run(lowered, {"hidden": x})[0], ort_run(dense, {"hidden": x})[0]
    np.testing.assert_allclose(got, body, atol=1e-5, rtol=1e-5)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in dense.graph.initializer}
    w, ids = reference_routing(x @ inits["gate.weight"].T, spec.k, normalization, order)
    gate_up = np.stack([np.concatenate([inits[f"experts.{e}.w1.weight"].T, inits[f"experts.{e}.w3.weight"].T], 1)
                        for e in range(spec.experts)])
    down = np.stack([inits[f"experts.{e}.w2.weight"].T for e in range(spec.experts)])
    np.testing.assert_allclose(got, reference_moe(x, w, ids, gate_up, down), atol=1e-5, rtol=1e-4)


def test_lower_ort_moe_distinguishes_the_modes() -> None:
    """The modes differ (softmax_topk + none does not sum its weights to 1): lowering all to one contrib
    setting would fail the comparison above."""
    x = np.random.default_rng(1).standard_normal((40, 32)).astype(np.float32) * 2
    outs = [ort_run(dense_layer(LayerSpec(hidden=32, inter=48, experts=8, k=3, normalization=n)), {"hidden": x})[0]
            for n in ("renormalize", "none")]
    assert np.abs(outs[0] - outs[1]).max() > 1e-2


def test_lower_ort_moe_refuses_a_mode_it_cannot_express() -> None:
    dense = dense_layer(LayerSpec(hidden=16, inter=24, experts=4, k=2))
    fused, counts = run_pipeline(dense)  # portable: MoE + TopKRouting stay
    graph = gs.import_onnx(fused)
    router = next(n for n in graph.nodes if n.op == "TopKRouting")
    router.attrs["order"] = "sigmoid_topk"  # a mode com.microsoft.MoE has no setting for
    reasons: list[str] = []
    assert lower_ort_moe.apply(graph, reasons) == 0 and len(moe_nodes(gs.export_onnx(graph))) == 1
    assert reasons == ["lower_ort_moe: MoE '" + moe_nodes(fused)[0].name + "': com.microsoft.MoE routes softmax "
                       "-> top-k (-> renormalize) only (router has order='sigmoid_topk', normalization='renormalize')"]
    assert lower_ort_moe.contrib_normalize("softmax_topk", "bogus") != 0


def test_interleaved_fc1_layout() -> None:
    gate_up = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # E=2, H=3, F=2
    fc1 = lower_ort_moe.interleaved_fc1(gate_up)
    assert fc1.shape == (2, 4, 3)
    np.testing.assert_array_equal(fc1[1, 0], gate_up[1, :, 0])  # g0
    np.testing.assert_array_equal(fc1[1, 1], gate_up[1, :, 2])  # u0
    np.testing.assert_array_equal(fc1[1, 3], gate_up[1, :, 3])  # u1


V3_REFUSED = {  # TopKRouting version 3 fields com.microsoft.MoE has no setting for -> the reason's words
    "sparsemixer": (ops.RoutingSpec(2, "none", scoring="sparsemixer", eps=0.01), "ignores use_sparse_mixer"),
    "sigmoid": (ops.RoutingSpec(2, "renormalize", scoring="sigmoid"), "scoring 'sigmoid' cannot map"),
    "bias": (ops.RoutingSpec(2, "none", bias=True), "selection bias (e_score_correction_bias) cannot map"),
    "groups": (ops.RoutingSpec(2, "none", n_group=4, topk_group=2), "grouped top-k (n_group=4, topk_group=2)"),
}


@pytest.mark.parametrize("case", V3_REFUSED)
def test_lower_ort_moe_refuses_v3_routing_by_name(case: str) -> None:
    """Each version-3 routing field ONNX Runtime's MoE cannot express: refused with one line naming it;
    the portable MoE + TopKRouting stay (and still compute the routing: the body runs it)."""
    routing, words = V3_REFUSED[case]
    layer = dense_layer(LayerSpec(hidden=16, inter=24, experts=8, k=2, routing=routing,
                                  selection_bias=tuple(np.linspace(-0.3, 0.3, 8)) if routing.bias else ()))
    out, counts = run_pipeline(layer, target="ort")
    assert counts["lower_ort_moe"] == 0 and len(moe_nodes(out)) == 1
    reasons: list[str] = []
    lower_ort_moe.apply(gs.import_onnx(run_pipeline(layer)[0]), reasons)
    assert len(reasons) == 1 and words in reasons[0], reasons
    x = np.random.default_rng(2).standard_normal((12, 16)).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, {"hidden": x})[0], ort_run(layer, {"hidden": x})[0], atol=1e-5)


def test_lower_ort_moe_folds_the_routed_scaling_factor() -> None:
    """softmax routing x routed_scaling_factor (DeepSeek-V2 greedy): the factor folds into the down weights;
    com.microsoft.MoE then equals the body, which differs from the unscaled layer."""
    routing = ops.RoutingSpec(3, "none", scaling=2.5)
    layer = dense_layer(LayerSpec(hidden=32, inter=48, experts=8, k=3, routing=routing))
    lowered, counts = run_pipeline(layer, target="ort")
    assert counts["lower_ort_moe"] == 1 and op_counts(lowered)[("com.microsoft", "MoE")] == 1
    x = np.random.default_rng(3).standard_normal((30, 32)).astype(np.float32)
    got, body = ort_run(lowered, {"hidden": x})[0], ort_run(layer, {"hidden": x})[0]
    np.testing.assert_allclose(got, body, atol=1e-5, rtol=1e-5)
    plain = ort_run(dense_layer(LayerSpec(hidden=32, inter=48, experts=8, k=3, normalization="none")),
                    {"hidden": x})[0]
    np.testing.assert_allclose(body, 2.5 * plain, rtol=1e-5, atol=1e-5)
