"""passes/nbits: mixport's blocked weights in ONNX Runtime's MatMulNBits layout compute exactly what
``quant.dequantize`` says (through ONNX Runtime at accuracy level 1: fp32 activations)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mixport import quant
from mixport.passes import nbits

SCHEMES = [quant.Scheme(8, 32), quant.Scheme(4, 64), quant.Scheme(4, 32, symmetric=False), quant.Scheme(4, 16)]


def _matmulnbits(p: nbits.NBits, x: np.ndarray) -> np.ndarray:
    inits = [numpy_helper.from_array(p.b, "B"), numpy_helper.from_array(p.scales, "S")]
    if p.zero_points is not None:
        inits.append(numpy_helper.from_array(p.zero_points, "Z"))
    node = helper.make_node("MatMulNBits", ["A", *(t.name for t in inits)], ["Y"], domain="com.microsoft",
                            accuracy_level=1, **p.attrs())
    graph = helper.make_graph([node], "nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, p.k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, p.n])], inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": x})[0]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.name}-b{s.block_size}")
@pytest.mark.parametrize(("k", "n"), [(96, 40), (100, 7)])  # a partial last block; odd sizes
def test_matmulnbits_layout_equals_dequantize(scheme: quant.Scheme, k: int, n: int) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32) + 0.3
    x = rng.standard_normal((3, k)).astype(np.float32)
    qz = quant.quantize(w, scheme, axis=0)
    packed = nbits.to_nbits(qz.q, qz.scale, qz.zero, scheme.block_size)
    nb = quant.blocks(k, scheme.block_size)
    assert packed.b.shape == (n, nb, scheme.block_size * scheme.bits // 8) and packed.scales.shape == (n, nb)
    assert (packed.zero_points is None) == scheme.symmetric
    want = x.astype(np.float64) @ quant.dequantized(qz).astype(np.float64)
    np.testing.assert_allclose(_matmulnbits(packed, x), want, atol=1e-4, rtol=1e-5)


def test_symmetric_codes_are_offset_by_the_default_zero_point() -> None:
    q = np.array([[-8], [7], [0], [-1]], dtype=quant.INT4)  # K=4, N=1
    packed = nbits.to_nbits(q, np.ones((1, 1), np.float32), None, 16)
    # codes q + 8 = 0, 15, 8, 7, low nibble first, padded to the block of 16 with 8 (dequantizes to 0)
    assert packed.b[0, 0, :3].tolist() == [0 | 15 << 4, 8 | 7 << 4, 8 | 8 << 4]


def test_expert_rows_stack_each_experts_layout() -> None:
    rng = np.random.default_rng(1)
    scheme = quant.Scheme(4, 32, symmetric=False)
    qz = quant.quantize(rng.standard_normal((3, 64, 24)).astype(np.float32), scheme, axis=1)
    weights, scales, zeros = nbits.expert_rows(qz.q, qz.scale, qz.zero, 32)
    assert weights.shape == (3, 24, 32) and scales.shape == (3, 24, 2) and zeros.shape == (3, 24, 1)
    one = nbits.to_nbits(qz.q[2], qz.scale[2], qz.zero[2], 32)
    np.testing.assert_array_equal(weights[2], one.b.reshape(24, -1))


def test_block_size_of() -> None:
    assert nbits.block_size_of(96, 3) == 32 and nbits.block_size_of(96, 2) == 64
    assert nbits.block_size_of(64, 1) == 64  # one block: the least power of two that holds it
    assert nbits.block_size_of(64, 5) is None
