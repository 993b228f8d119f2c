"""The quantized MoE oracle and the int4 kernel layout, checked against ONNX itself (no Triton).

# E experts, H hidden, F intermediate, B block size
"""

from __future__ import annotations

import numpy as np
import pytest

from mixport import quant
from mixport.plugins.kernels.qlayout import from_onnx_int4, is_onnx_identical, packed_row_bytes
from mixport.plugins.kernels.reference import reference_moe, reference_moe_quantized, reference_routing


def onnx_raw(q: np.ndarray) -> bytes:
    """The raw_data ONNX writes for ``q`` (onnx_ir packs INT4/UINT4 as files hold them)."""
    import onnx_ir as ir

    return ir.serde.serialize_tensor(ir.tensor(q, name="q")).raw_data


def decode(kernel: np.ndarray, n: int, segments: int, signed: bool) -> np.ndarray:
    """The kernel layout read back as the kernels read it: per segment, low nibble first."""
    lo, hi = (kernel & 0x0F).astype(np.int16), (kernel >> 4).astype(np.int16)
    both = np.stack([lo, hi], axis=-1).reshape(*kernel.shape[:-1], segments, -1)[..., : n // segments]
    both = both.reshape(*kernel.shape[:-1], n)
    return np.where(both > 7, both - 16, both) if signed else both


@pytest.mark.parametrize(("shape", "segments"), [((3, 5, 8), 2), ((3, 5, 6), 2), ((2, 7, 10), 1),
                                                 ((2, 7, 9), 1), ((1, 1, 2), 2)])
@pytest.mark.parametrize("signed", [True, False])
def test_kernel_layout_from_onnx_bytes(shape: tuple[int, ...], segments: int, signed: bool) -> None:
    rng = np.random.default_rng(sum(shape))
    lo, hi = (-8, 8) if signed else (0, 16)
    q = rng.integers(lo, hi, size=shape).astype(quant.INT4 if signed else quant.UINT4)
    raw = np.frombuffer(onnx_raw(q), np.uint8)
    kernel = from_onnx_int4(raw, shape, segments)
    assert kernel.dtype == np.uint8 and kernel.shape == (*shape[:-1], packed_row_bytes(shape[-1], segments))
    np.testing.assert_array_equal(decode(kernel, shape[-1], segments, signed), q.astype(np.int16))
    # even segments: ONNX's own bytes, not a copy (an engine builder only re-types the initializer)
    assert np.shares_memory(kernel, raw) == is_onnx_identical(shape[-1], segments)


def test_kernel_layout_rejects_wrong_sizes() -> None:
    with pytest.raises(ValueError, match="do not hold"):
        from_onnx_int4(np.zeros(5, np.uint8), (2, 3, 4), 2)
    with pytest.raises(ValueError, match="equal segments"):
        packed_row_bytes(7, 2)


def _dequantize_with_onnx(qz: quant.Quantized) -> np.ndarray:
    """ONNX's reference DequantizeLinear (blocked, axis 1, opset 21) over the stacked experts."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    inputs = [numpy_helper.from_array(qz.q, "q"), numpy_helper.from_array(qz.scale, "s")]
    if qz.zero is not None:
        inputs.append(numpy_helper.from_array(qz.zero, "z"))
    node = helper.make_node("DequantizeLinear", [t.name for t in inputs], ["w"], axis=1,
                            block_size=qz.block_size)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("w", 1, None)], inputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return ReferenceEvaluator(model).run(None, {})[0]


@pytest.mark.parametrize(("bits", "symmetric", "block"), [(8, True, 32), (4, True, 64), (4, False, 32)])
def test_quantized_reference_is_the_float_reference_on_onnx_dequantized_weights(
        bits: int, symmetric: bool, block: int) -> None:
    """Hidden 80 and FFN 42 are not multiples of the block: the last block of each is short."""
    h, f, e, t, k = 80, 42, 4, 9, 2
    rng = np.random.default_rng(bits + block)
    gate_up = (rng.standard_normal((e, h, 2 * f)) / h**0.5).astype(np.float32)
    down = (rng.standard_normal((e, f, h)) / f**0.5).astype(np.float32)
    hidden = rng.standard_normal((t, h)).astype(np.float32)
    weights, ids = reference_routing(rng.standard_normal((t, e)), k)
    scheme = quant.Scheme(bits, block, symmetric)
    qg, qd = quant.quantize(gate_up, scheme), quant.quantize(down, scheme)
    got = reference_moe_quantized(hidden, weights, ids, qg.q, qd.q, qg.scale, qd.scale, qg.zero, qd.zero,
                                  block_size=block)
    want = reference_moe(hidden, weights, ids, _dequantize_with_onnx(qg), _dequantize_with_onnx(qd))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # and quantization did change the numbers: the oracle is not the float model by accident
    assert np.abs(got - reference_moe(hidden, weights, ids, gate_up, down)).max() > 1e-4
