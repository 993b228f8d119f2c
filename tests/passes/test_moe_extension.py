"""The MoE contract's version "3" (ops.py: expert biases + the clamped SwiGLU, GPT-OSS) in every ONNX
form against the float64 numpy oracle: the function bodies (sorted, nonzero, dense), the fast
ONNX Runtime graph's variant (ORT_CPU, QuickGelu with alpha), quantized experts (biases stay
float), fp32 and fp16, with inputs large enough that both clamps engage.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mixport import ops, quant
from mixport.passes import moe_bodies
from mixport.passes.emit import Nodes
from mixport.plugins.kernels.reference import reference_moe, reference_moe_quantized, reference_routing
from tests.passes.test_moe_bodies import _io, _run

# T tokens, H hidden, F intermediate, E experts, k active
H, F, E, K = 16, 32, 4, 2
ALPHA, LIMIT = 1.702, 2.5  # a low limit: many gate / up values cross it
FLOATS = {"fp32": (np.float32, TensorProto.FLOAT, 1e-5), "fp16": (np.float16, TensorProto.FLOAT16, 2e-2)}
EXT = moe_bodies.Extension("swiglu_clamped", ALPHA, LIMIT)


def _inputs(t: int, np_type: type, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((t, E))
    logits[:, E - 1] -= 30.0  # one expert never picked
    weights, ids = reference_routing(logits, K, "none", "topk_softmax")
    return {"hidden": (2 * rng.standard_normal((t, H))).astype(np_type), "weights": weights.astype(np_type),
            "ids": ids, "gate_up": (rng.standard_normal((E, H, 2 * F)) * 0.6).astype(np_type),
            "down": (rng.standard_normal((E, F, H)) * F**-0.5).astype(np_type),
            "gate_up_bias": rng.standard_normal((E, 2 * F)).astype(np_type),
            "down_bias": rng.standard_normal((E, H)).astype(np_type)}


def _oracle(a: dict[str, np.ndarray], activation: str = "swiglu_clamped") -> np.ndarray:
    return reference_moe(a["hidden"], a["weights"], a["ids"], a["gate_up"], a["down"], a["gate_up_bias"],
                         a["down_bias"], activation, ALPHA, LIMIT)


def _model(variant: str, arrays: dict[str, np.ndarray], elem: int, ext: moe_bodies.Extension,
           quantized: tuple[moe_bodies.Quant, dict[str, np.ndarray]] | None = None) -> onnx.ModelProto:
    """A version-"3" mixport::MoE node with the shipped body, or the fast graph's variant inline."""
    if variant == "ort_cpu":
        em = Nodes()
        inits = [numpy_helper.from_array(np.ascontiguousarray(arrays[w][e]), f"{w}.{e}")
                 for e in range(E) for w in ("gate_up", "down", "gate_up_bias", "down_bias")]
        ext_e = moe_bodies.Extension(ext.activation, ext.alpha, ext.limit,
                                     lambda e: (f"gate_up_bias.{e}", None, f"down_bias.{e}"))
        moe_bodies.sparse_moe(em, "hidden", "weights", "ids", K, E, lambda e: (f"gate_up.{e}", None, f"down.{e}"),
                              moe_bodies.ORT_CPU, elem, out="out", ext=ext_e)
        nodes, functions, opset = em.nodes, [], ops.ONNX_OPSET
    else:
        q, stored = quantized if quantized else (None, arrays)
        names = [*(q.inputs if q else ops.MOE_INPUTS), *ops.BIAS_INPUTS]
        inits = [numpy_helper.from_array(np.asarray(stored[n]), n) if q else numpy_helper.from_array(stored[n], n)
                 for n in names[3:]]
        attrs = dict(num_experts=E, k=K, activation=ext.activation, alpha=ext.alpha, limit=ext.limit,
                     plugin_version=ops.BIAS_PLUGIN_VERSION)
        if q:
            attrs.update(bits=q.bits, block_size=q.block_size)
        nodes = [helper.make_node(ops.MOE, names, ["out"], domain=ops.DOMAIN, **attrs)]
        functions = [moe_bodies.moe_function(variant, E, K, F, q, ext)]
        opset = ops.QUANT_OPSET if q else ops.ONNX_OPSET
    graph = helper.make_graph(nodes, "moe", [_io("hidden", elem, ["T", H]), _io("weights", elem, ["T", K]),
                                             _io("ids", TensorProto.INT64, ["T", K])],
                              [_io("out", elem, ["T", H])], inits)
    return helper.make_model(graph, functions=functions, ir_version=10, opset_imports=[
        helper.make_opsetid("", opset), helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION),
        helper.make_opsetid(moe_bodies.MS_DOMAIN, 1)])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("variant", [*moe_bodies.BODIES, "ort_cpu"])
@pytest.mark.parametrize("activation", ["swiglu_clamped", "swiglu"])
def test_biased_clamped_moe_matches_the_oracle(variant: str, dtype: str, activation: str) -> None:
    np_type, elem, tol = FLOATS[dtype]
    arrays = _inputs(13, np_type, seed=1)
    ext = moe_bodies.Extension(activation, ALPHA, LIMIT)
    feed = {n: arrays[n] for n in ("hidden", "weights", "ids")}
    (out,) = _run(_model(variant, arrays, elem, ext), feed)
    want = _oracle(arrays, activation)
    np.testing.assert_allclose(out.astype(np.float64), want, atol=tol * 10, rtol=tol)
    if activation == "swiglu_clamped":  # the clamps engaged: unclamped would differ
        assert np.abs(_oracle(arrays, "swiglu") - want).max() > 0.1
        h = arrays["hidden"].astype(np.float64) @ arrays["gate_up"][0].astype(np.float64)
        assert (h > LIMIT).any() and (h < -LIMIT).any()


def test_biases_count() -> None:
    """Zero biases give the version-1 numbers: the biases are really added (not ignored)."""
    arrays = _inputs(5, np.float32, seed=2)
    zero = {**arrays, "gate_up_bias": np.zeros_like(arrays["gate_up_bias"]),
            "down_bias": np.zeros_like(arrays["down_bias"])}
    feed = {n: arrays[n] for n in ("hidden", "weights", "ids")}
    (out,) = _run(_model("sorted", zero, TensorProto.FLOAT, EXT), feed)
    np.testing.assert_allclose(out, _oracle(zero), atol=1e-5)
    assert np.abs(_oracle(zero) - _oracle(arrays)).max() > 0.1


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("variant", ["sorted", "dense"])
def test_quantized_experts_keep_float_biases(bits: int, variant: str) -> None:
    arrays = _inputs(7, np.float32, seed=3)
    scheme = quant.Scheme(bits=bits, block_size=16, symmetric=True)
    stored = dict(arrays)
    for w, (qn, sn) in zip(("gate_up", "down"), zip(ops.MOE_INPUTS[3:], ops.QUANT_INPUTS, strict=True), strict=True):
        q = quant.quantize(arrays[w], scheme, axis=1)
        stored[qn], stored[sn] = q.q, q.scale
    q = moe_bodies.Quant(bits, 16, False)
    feed = {n: arrays[n] for n in ("hidden", "weights", "ids")}
    (out,) = _run(_model(variant, arrays, TensorProto.FLOAT, EXT, (q, stored)), feed)
    want = reference_moe_quantized(arrays["hidden"], arrays["weights"], arrays["ids"], stored["gate_up"],
                                   stored["down"], stored["gate_up_scale"], stored["down_scale"], block_size=16,
                                   gate_up_bias=arrays["gate_up_bias"], down_bias=arrays["down_bias"],
                                   activation="swiglu_clamped", alpha=ALPHA, limit=LIMIT)
    np.testing.assert_allclose(out, want, atol=1e-4, rtol=1e-4)


def _routed_model(arrays: dict[str, np.ndarray], router: np.ndarray, router_bias: np.ndarray,
                  quantized: moe_bodies.Quant | None = None) -> onnx.ModelProto:
    """hidden -> router Linear with a bias -> TopKRouting (top-k of the logits, softmax over the k) ->
    a version-"3" MoE node: the fused graph a GPT-OSS layer exports to."""
    from mixport.exporter.routing_onnx import routing_function

    h, e = router.shape
    f = arrays["down"].shape[1]
    names = [*(quantized.inputs if quantized else ops.MOE_INPUTS), *ops.BIAS_INPUTS]
    inits = [numpy_helper.from_array(np.asarray(arrays[n]), n) for n in names[3:]]
    inits += [numpy_helper.from_array(router, "router"), numpy_helper.from_array(router_bias, "router_bias")]
    attrs = dict(num_experts=e, k=K, activation=EXT.activation, alpha=EXT.alpha, limit=EXT.limit,
                 plugin_namespace=ops.PLUGIN_NAMESPACE, plugin_version=ops.BIAS_PLUGIN_VERSION)
    if quantized:
        attrs.update(bits=quantized.bits, block_size=quantized.block_size)
    nodes = [helper.make_node("MatMul", ["hidden", "router"], ["mm"]),
             helper.make_node("Add", ["mm", "router_bias"], ["logits"]),
             helper.make_node(ops.TOPK_ROUTING, ["logits"], ["weights", "ids"], domain=ops.DOMAIN, k=K, num_experts=e,
                              scoring_func="softmax", normalization="none", order="topk_softmax",
                              plugin_namespace=ops.PLUGIN_NAMESPACE, plugin_version=ops.ROUTING_PLUGIN_VERSION),
             helper.make_node(ops.MOE, ["hidden", "weights", "ids", *names[3:]], ["out"], domain=ops.DOMAIN, **attrs)]
    graph = helper.make_graph(nodes, "moe", [_io("hidden", TensorProto.FLOAT, ["T", h])],
                              [_io("out", TensorProto.FLOAT, ["T", h])], inits)
    opset = ops.QUANT_OPSET if quantized else ops.ONNX_OPSET
    routing = routing_function(K, "none", TensorProto.FLOAT, "topk_softmax")
    for imp in routing.opset_import:  # a quantized model imports the standard opset QUANT_OPSET
        imp.version = opset if imp.domain == "" else imp.version
    return helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", opset), helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION)],
        functions=[routing, moe_bodies.moe_function("sorted", e, K, f, quantized, EXT)])


def _router(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((H, E)).astype(np.float32), rng.standard_normal(E).astype(np.float32)


def test_ort_lowering_maps_biases_and_the_clamped_swiglu_exactly() -> None:
    """--target ort: com.microsoft.MoE with fc1/fc2 biases (fc1's interleaved), activation_alpha = alpha,
    activation_beta = 1, swiglu_limit = limit computes the contract (its body and the float64 oracle)."""
    from mixport.passes import run_pipeline

    arrays = _inputs(29, np.float32, seed=4)
    router, router_bias = _router(5)
    model = _routed_model(arrays, router, router_bias)
    lowered, counts = run_pipeline(model, target="ort")
    (node,) = [n for n in lowered.graph.node if n.domain == moe_bodies.MS_DOMAIN]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert counts["lower_ort_moe"] == 1 and node.op_type == "MoE" and node.input[3] and node.input[5]
    assert (attrs["activation_alpha"], attrs["activation_beta"], attrs["swiglu_limit"]) == \
        pytest.approx((ALPHA, 1.0, LIMIT))
    x = arrays["hidden"]
    weights, ids = reference_routing(x.astype(np.float64) @ router + router_bias, K, "none", "topk_softmax")
    want = _oracle({**arrays, "weights": weights, "ids": ids})
    (got,) = _run(lowered, {"hidden": x})
    (body,) = _run(model, {"hidden": x})
    np.testing.assert_allclose(body, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_ort_lowering_of_quantized_biased_experts() -> None:
    """int4 experts with float biases -> com.microsoft.QMoE with the same biases and activation, equal to
    the quantized body (ONNX Runtime's 4-bit CPU kernel computes exactly at the accuracy level mixport sets)."""
    from mixport.passes import run_pipeline

    arrays = _inputs(17, np.float32, seed=6)
    scheme = quant.Scheme(bits=4, block_size=16, symmetric=True)
    stored = dict(arrays)
    for w, (qn, sn) in zip(("gate_up", "down"), zip(ops.MOE_INPUTS[3:], ops.QUANT_INPUTS, strict=True), strict=True):
        q = quant.quantize(arrays[w], scheme, axis=1)
        stored[qn], stored[sn] = q.q, q.scale
    model = _routed_model(stored, *_router(7), moe_bodies.Quant(4, 16, False))
    lowered, counts = run_pipeline(model, target="ort")
    assert counts["lower_ort_moe"] == 1
    assert [n.op_type for n in lowered.graph.node if n.domain == moe_bodies.MS_DOMAIN] == ["QMoE"]
    for node in lowered.graph.node:  # accuracy level 1: fp32 activations, exact (mixport run's 4 rounds them to int8)
        for attr in node.attribute:
            if (node.op_type, attr.name) == ("QMoE", "accuracy_level"):
                attr.i = 1
    x = arrays["hidden"]
    (got,) = _run(lowered, {"hidden": x})
    (body,) = _run(model, {"hidden": x})
    np.testing.assert_allclose(got, body, atol=1e-4, rtol=1e-4)

