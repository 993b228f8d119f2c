"""Every ONNX form of the op contract against the float64 numpy oracle (plugins/kernels/reference.py).

MoE: the shipped function bodies (sorted, nonzero, dense) and the fast ONNX Runtime graph's
variant (moe_bodies.ORT_CPU); routing: the TopKRouting body in both normalizations. Each runs
in ONNX Runtime on random inputs, fp32 and fp16, T=1 and more, with an expert that gets no
token. Also: ONNX Runtime folds the sparse body's weight slabs at load time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mixport import ops
from mixport.exporter import routing_onnx
from mixport.passes import moe_bodies, run_pipeline
from mixport.passes.emit import Nodes
from mixport.plugins.kernels.reference import reference_moe, reference_routing
from mixport.tools.moe_layer import LayerSpec, dense_layer

# T tokens, H hidden, F intermediate, E experts, k active
H, F, E, K = 16, 24, 4, 2
EMPTY = E - 1  # the expert no token is routed to
FLOATS = {"fp32": (np.float32, TensorProto.FLOAT, 1e-5), "fp16": (np.float16, TensorProto.FLOAT16, 1e-2)}
MOE_VARIANTS = [*moe_bodies.BODIES, "ort_cpu"]


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feed)


def _io(name: str, elem: int, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


def _moe_inputs(t: int, np_type: type, seed: int) -> dict[str, np.ndarray]:
    """hidden, routing (weights, ids: top-k of random logits, expert EMPTY never chosen) and experts."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((t, E))
    logits[:, EMPTY] -= 30.0
    weights, ids = reference_routing(logits, K)
    assert EMPTY not in ids
    return {"hidden": rng.standard_normal((t, H)).astype(np_type), "weights": weights.astype(np_type), "ids": ids,
            "gate_up": (rng.standard_normal((E, H, 2 * F)) * H**-0.5).astype(np_type),
            "down": (rng.standard_normal((E, F, H)) * F**-0.5).astype(np_type)}


def _moe_model(variant: str, arrays: dict[str, np.ndarray], elem: int) -> onnx.ModelProto:
    """One MoE computation: a mixport::MoE node with the shipped body, or the fast graph's
    variant emitted inline over per-expert [H, 2F] / [F, H] initializers (as ort_graph does)."""
    if variant == "ort_cpu":
        em = Nodes()
        inits = [numpy_helper.from_array(np.ascontiguousarray(arrays[w][e]), f"{w}.{e}")
                 for e in range(E) for w in ("gate_up", "down")]
        moe_bodies.sparse_moe(em, "hidden", "weights", "ids", K, E, lambda e: (f"gate_up.{e}", None, f"down.{e}"),
                              moe_bodies.ORT_CPU, elem, out="out")
        nodes, functions = em.nodes, []
    else:
        inits = [numpy_helper.from_array(arrays[w], w) for w in ("gate_up", "down")]
        nodes = [helper.make_node(ops.MOE, moe_bodies.INPUTS, ["out"], domain=ops.DOMAIN, num_experts=E, k=K,
                                  activation="swiglu")]
        functions = [moe_bodies.moe_function(variant, E, K, F)]
    graph = helper.make_graph(nodes, "moe", [_io("hidden", elem, ["T", H]), _io("weights", elem, ["T", K]),
                                             _io("ids", TensorProto.INT64, ["T", K])],
                              [_io("out", elem, ["T", H])], inits)
    return helper.make_model(graph, functions=functions, ir_version=10, opset_imports=[
        helper.make_opsetid("", ops.ONNX_OPSET), helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION),
        helper.make_opsetid(moe_bodies.MS_DOMAIN, 1)])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("t", [1, 2, 13])
@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_moe_variant_matches_the_reference(variant: str, t: int, dtype: str) -> None:
    np_type, elem, tol = FLOATS[dtype]
    arrays = _moe_inputs(t, np_type, seed=t)
    (out,) = _run(_moe_model(variant, arrays, elem), {n: arrays[n] for n in ("hidden", "weights", "ids")})
    assert out.dtype == np_type and out.shape == (t, H)
    want = reference_moe(**arrays)  # float64 from the same (rounded) inputs
    np.testing.assert_allclose(out.astype(np.float64), want, rtol=tol, atol=tol * np.abs(want).max())


def test_reference_oracle_is_not_trivially_matched() -> None:
    """The comparison above can fail: a wrong expert or a dropped weight changes the result."""
    arrays = _moe_inputs(13, np.float32, seed=13)
    want = reference_moe(**arrays)
    (out,) = _run(_moe_model("sorted", arrays, TensorProto.FLOAT), {n: arrays[n] for n in ("hidden", "weights", "ids")})
    assert np.abs(want).max() > 0.1
    swapped = {**arrays, "ids": arrays["ids"][:, ::-1].copy()}  # weights paired with the other expert
    assert not np.allclose(out, reference_moe(**swapped), atol=1e-3)


def _routing_model(normalization: str, elem: int) -> onnx.ModelProto:
    node = helper.make_node(ops.TOPK_ROUTING, ["logits"], ["weights", "ids"], domain=ops.DOMAIN,
                            **routing_onnx.routing_attributes(K, E, normalization))
    graph = helper.make_graph([node], "routing", [_io("logits", elem, ["T", E])],
                              [_io("weights", elem, ["T", K]), _io("ids", TensorProto.INT64, ["T", K])])
    return helper.make_model(graph, functions=[routing_onnx.routing_function(K, normalization, elem)],
                             ir_version=10, opset_imports=[helper.make_opsetid("", ops.ONNX_OPSET),
                                                           helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION)])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("t", [1, 13])
@pytest.mark.parametrize("normalization", ops.NORMALIZATIONS)
def test_routing_body_matches_the_reference(normalization: str, t: int, dtype: str) -> None:
    np_type, elem, tol = FLOATS[dtype]
    logits = (np.random.default_rng(t).standard_normal((t, E)) * 2).astype(np_type)
    weights, ids = _run(_routing_model(normalization, elem), {"logits": logits})
    want_w, want_ids = reference_routing(logits, K, normalization)
    assert weights.dtype == np_type and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(weights.astype(np.float64), want_w, rtol=tol, atol=tol / 10)
    sums = want_w.sum(axis=1)
    assert np.allclose(sums, 1.0) == (normalization == "renormalize")  # the two modes differ here


def test_routing_builder_refuses_an_unknown_normalization() -> None:
    with pytest.raises(ValueError, match="normalization"):
        routing_onnx.routing_function(K, "sigmoid", TensorProto.FLOAT)


def test_ort_folds_weight_slabs_instead_of_copying_per_run(tmp_path: Path) -> None:
    """After ORT's load-time optimizations no Gather/Slice reads weights: each expert has its own
    initializer and a run reads it in place (timing evidence: tools/bench_moe.py, `fused no-fold`)."""
    fused, _ = run_pipeline(dense_layer(LayerSpec(hidden=32, inter=48, experts=4, k=2)))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(fused.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    weights = {t.name for t in optimized.graph.initializer if len(t.dims) >= 2}
    slicing = [n for n in optimized.graph.node if n.op_type in ("Gather", "Slice") and n.input[0] in weights]
    assert not slicing, [n.input[0] for n in slicing]
    stacked = {t.name for t in fused.graph.initializer if len(t.dims) == 3}
    assert stacked and not stacked & weights  # the stacked slabs are gone, folded per expert
    matmul_weights = {n.input[1] for n in optimized.graph.node if n.op_type == "MatMul"}
    assert len(matmul_weights & weights) == 3 * 4  # gate, up, down for each of the 4 experts


def test_bodies_declare_the_contract_signature() -> None:
    for target in ("portable", "trt-noplugin"):
        fused, _ = run_pipeline(dense_layer(LayerSpec(hidden=16, inter=24, experts=4, k=1)), target=target)
        body = next(f for f in fused.functions if f.domain == ops.DOMAIN and f.name == ops.MOE)
        assert list(body.input) == ["hidden", "weights", "ids", "gate_up", "down"]
        assert list(body.output) == ["out"]
        assert set(body.attribute) == {"num_experts", "k", "activation", "plugin_namespace", "plugin_version"}


@pytest.mark.parametrize(("body", "must", "must_not"), [
    ("sorted", {"TopK", "Split", "MatMul"}, {"NonZero", "ScatterND", "ScatterElements", "QuickGelu"}),
    ("nonzero", {"NonZero", "MatMul"}, {"ScatterND", "ScatterElements", "QuickGelu"}),
    ("dense", {"MatMul"}, {"NonZero", "ScatterND", "ScatterElements", "TopK", "QuickGelu"}),
])
def test_bodies_use_standard_ops_only(body: str, must: set[str], must_not: set[str]) -> None:
    """Function bodies run anywhere: standard domain only; dense has nothing TensorRT's parser rejects."""
    function = moe_bodies.moe_function(body, E, K, F)
    kinds = {n.op_type for n in function.node}
    assert {n.domain for n in function.node} == {""}
    assert must <= kinds and not must_not & kinds
