"""lower_ort_moe on quantized MoE nodes: com.microsoft.QMoE computes what the portable function body
(blocked DequantizeLinear + the sparse body) computes, or the node stays with the reason why not."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from mixport import quant
from mixport.passes import QuantOptions, lower_ort_moe, run_passes
from mixport.tools.moe_layer import LayerSpec, dense_layer

from .conftest import moe_nodes, op_counts, ort_run

SPEC = LayerSpec(hidden=64, inter=96, experts=4, k=2)
SCHEMES = {"int8": quant.Scheme(8, 32), "int4": quant.Scheme(4, 32), "int4-zp": quant.Scheme(4, 32, symmetric=False),
           "int4-b16": quant.Scheme(4, 16)}


def _lowered(scheme: quant.Scheme, spec: LayerSpec = SPEC) -> tuple[onnx.ModelProto, onnx.ModelProto, dict]:
    """(portable quantized layer, its ``ort`` lowering, the lowering's counts)."""
    layer = dense_layer(spec)
    portable = run_passes(layer, "portable", quantize=QuantOptions(scheme)).model
    report = run_passes(layer, "ort", quantize=QuantOptions(scheme))
    return portable, report.model, {**report.counts, "reasons": report.reasons}


def _with_level(model: onnx.ModelProto, level: int) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "QMoE" and attr.name == "accuracy_level":
                attr.i = level
    return model


@pytest.mark.parametrize("name", list(SCHEMES))
def test_qmoe_matches_the_portable_body(name: str) -> None:
    """4-bit: exact at accuracy level 1 (fp32 activations); 8-bit: QMoE's CPU kernel quantizes the
    activations to int8 at every level, so within that rounding (measured ~1e-2 of outputs ~1)."""
    scheme = SCHEMES[name]
    portable, lowered, counts = _lowered(scheme)
    assert counts["lower_ort_moe"] == 1 and not moe_nodes(lowered), counts
    (node,) = [n for n in lowered.graph.node if n.domain == "com.microsoft"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert node.op_type == "QMoE" and attrs["expert_weight_bits"] == scheme.bits
    assert attrs["block_size"] == scheme.block_size and attrs["swiglu_fusion"] == 1
    assert len([i for i in node.input if i]) == 6 + 2 * (not scheme.symmetric)  # + the zero points
    x = np.random.default_rng(0).standard_normal((24, SPEC.hidden)).astype(np.float32)
    want = ort_run(portable, {"hidden": x})[0]
    got = ort_run(_with_level(lowered, 1), {"hidden": x})[0]
    tol = 1e-4 if scheme.bits == 4 else 5e-2
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    assert np.abs(ort_run(lowered, {"hidden": x})[0] - want).max() < 0.1 * np.abs(want).max()  # level 4


def test_a_partial_block_is_refused_with_the_reason() -> None:
    """int4 with blocks of 64 over the intermediate size 96: the contract's last block is partial,
    QMoE wants whole blocks: the MoE node stays (its function body runs) and the reason says so."""
    portable, lowered, counts = _lowered(quant.Scheme(4, 64))
    assert counts["lower_ort_moe"] == 0 and len(moe_nodes(lowered)) == 1
    assert op_counts(lowered)[("com.microsoft", "QMoE")] == 0
    assert any("block_size 64 must divide hidden 64 and intermediate 96" in r for r in counts["reasons"])
    x = np.random.default_rng(1).standard_normal((5, SPEC.hidden)).astype(np.float32)
    np.testing.assert_allclose(ort_run(lowered, {"hidden": x})[0], ort_run(portable, {"hidden": x})[0], atol=1e-5)


def test_refusal_reasons() -> None:
    assert lower_ort_moe.qmoe_refusal(64, 96, 4, 32) is None
    assert "whole blocks" in lower_ort_moe.qmoe_refusal(64, 96, 4, 64)
    assert "4- or 8-bit" in lower_ort_moe.qmoe_refusal(64, 96, 2, 32)


def test_interleave_columns() -> None:
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # F = 2: gate columns 0, 1; up columns 2, 3
    np.testing.assert_array_equal(lower_ort_moe.interleave_columns(a)[1, 2], a[1, 2][[0, 2, 1, 3]])
    assert lower_ort_moe.interleave_columns(None) is None


def test_the_unlowered_quantized_graph_keeps_its_node() -> None:
    graph = gs.import_onnx(run_passes(dense_layer(SPEC), "portable", quantize=QuantOptions(SCHEMES["int4"])).model)
    router = next(n for n in graph.nodes if n.op == "TopKRouting")
    router.attrs["order"] = "sigmoid_topk"
    reasons: list[str] = []
    assert lower_ort_moe.apply(graph, reasons) == 0 and "routes softmax" in reasons[0]
