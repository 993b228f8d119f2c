"""Quantized MoE kernels (int8 / int4 / uint4 + zero points) vs the float64 NumPy oracle, interpreted.

# T tokens, E experts, H hidden, F intermediate, k active, B block size

Weights are quantized by ``mixport.quant`` (the contract's numbers), packed as ONNX files hold
them (onnx_ir) and brought to the kernel layout by ``qlayout.from_onnx_int4``. H = 80 and F = 45
are multiples of no block size (short last blocks; 80 < 128: one short block) and F is odd (the
gate | up halves are repacked); F = 48 takes ONNX's bytes as they are, H = 81 repacks down. Every test here is
``triton_interpret`` (a child session with TRITON_INTERPRET=1, see conftest).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import require_module

torch = require_module("torch")
require_module("triton")

from mixport import quant  # noqa: E402
from mixport.errors import MixportError  # noqa: E402
from mixport.plugins import kernels as K  # noqa: E402
from mixport.plugins.kernels.qlayout import SEGMENTS  # noqa: E402

pytestmark = pytest.mark.triton_interpret

H = 80
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
NP_FLOAT = {torch.float32: np.float32, torch.float16: np.float16}
SCHEMES = {"int8": (8, True), "int4": (4, True), "int4-zp": (4, False)}


def onnx_bytes(q: np.ndarray) -> np.ndarray:
    import onnx_ir as ir

    return np.frombuffer(ir.serde.serialize_tensor(ir.tensor(q, name="q")).raw_data, np.uint8)


def kernel_tensor(q: np.ndarray | None, segments: int) -> torch.Tensor | None:
    """A contract tensor (int8, or int4 / uint4 values) as the kernels take it."""
    if q is None:
        return None
    if q.dtype == np.int8:
        return torch.from_numpy(q)
    return torch.from_numpy(K.from_onnx_int4(onnx_bytes(q), q.shape, segments).copy())


def _layer(t: int, e: int, k: int, f: int, dtype: torch.dtype, scheme: str, block: int,
           seed: int = 0, h: int = H) -> tuple[dict[str, torch.Tensor | None], dict[str, np.ndarray | None]]:
    """(kernel inputs, the contract's numpy tensors) for a random quantized layer."""
    g = torch.Generator().manual_seed(seed)
    w, ids = K.reference_routing(torch.randn(t, e, generator=g), k)
    hidden = torch.randn(t, h, generator=g).to(dtype)
    npf = NP_FLOAT.get(dtype, np.float32)
    bits, symmetric = SCHEMES[scheme]
    sch = quant.Scheme(bits, block, symmetric)
    qg = quant.quantize((torch.randn(e, h, 2 * f, generator=g) / h**0.5).numpy().astype(npf), sch)
    qd = quant.quantize((torch.randn(e, f, h, generator=g) / f**0.5).numpy().astype(npf), sch)
    contract = {"gate_up": qg.q, "down": qd.q, "gate_up_scale": qg.scale, "down_scale": qd.scale,
                "gate_up_zero": qg.zero, "down_zero": qd.zero}
    seg = {name: SEGMENTS[name.removesuffix("_zero")] for name in ("gate_up", "down", "gate_up_zero", "down_zero")}
    inputs = {"hidden": hidden, "weights": torch.from_numpy(w).to(dtype), "ids": torch.from_numpy(ids),
              **{name: kernel_tensor(contract[name], s) for name, s in seg.items()},
              "gate_up_scale": torch.from_numpy(qg.scale).to(dtype),
              "down_scale": torch.from_numpy(qd.scale).to(dtype)}
    return inputs, contract


def _reference(inputs: dict[str, torch.Tensor | None], contract: dict[str, np.ndarray | None],
               block: int) -> np.ndarray:
    return K.reference_moe_quantized(inputs["hidden"], inputs["weights"], inputs["ids"], **contract,
                                     block_size=block)


def _error(got: torch.Tensor, ref: np.ndarray) -> float:
    """Max abs error relative to the reference's largest magnitude."""
    return float(np.abs(got.float().numpy() - ref).max()) / max(float(np.abs(ref).max()), 1e-6)


def _bits(scheme: str) -> int:
    return SCHEMES[scheme][0]


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantized_moe_matches_reference(scheme: str, block: int, dtype: torch.dtype) -> None:
    inputs, contract = _layer(37, 8, 2, 45, dtype, scheme, block, seed=block)
    out = K.fused_moe_quantized(**inputs, bits=_bits(scheme), block_size=block)
    assert out.shape == (37, H) and out.dtype == dtype
    assert _error(out, _reference(inputs, contract, block)) <= TOL[dtype]


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize(("t", "f", "block_m"), [(1, 48, None), (37, 48, 64), (5, 45, 16)])
def test_quantized_moe_shapes(scheme: str, t: int, f: int, block_m: int | None) -> None:
    """Decode (T=1), F/2 even (ONNX's bytes unchanged), prefill tiles (BLOCK_M 64)."""
    inputs, contract = _layer(t, 8, 2, f, torch.float32, scheme, 32, seed=t + f)
    out = K.fused_moe_quantized(**inputs, bits=_bits(scheme), block_size=32, block_m=block_m)
    assert _error(out, _reference(inputs, contract, 32)) <= TOL[torch.float32]


def test_quantized_moe_bf16_upcast_in_interpreter() -> None:
    inputs, contract = _layer(37, 8, 2, 45, torch.bfloat16, "int4", 32, seed=5)
    out = K.fused_moe_quantized(**inputs, bits=4, block_size=32)
    assert _error(out, _reference(inputs, contract, 32)) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_same_numbers_as_the_float_kernel_on_dequantized_weights(scheme: str) -> None:
    """Dequantizing in the inner loop gives the weights DequantizeLinear gives: fp32 results equal
    the float kernel's on the dequantized experts (same tiles, same order)."""
    inputs, contract = _layer(37, 8, 2, 45, torch.float32, scheme, 32, seed=11)
    deq = {name: torch.from_numpy(quant.dequantize(contract[name], contract[f"{name}_scale"],
                                                   contract[f"{name}_zero"], axis=1, block_size=32))
           for name in ("gate_up", "down")}
    floats = K.fused_moe(inputs["hidden"], inputs["weights"], inputs["ids"], deq["gate_up"], deq["down"])
    quantized = K.fused_moe_quantized(**inputs, bits=_bits(scheme), block_size=32)
    np.testing.assert_allclose(quantized.numpy(), floats.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("broken", ["onnx_bytes_unconverted", "nibbles_swapped", "scale_block_shifted"])
def test_a_wrong_layout_is_caught(broken: str) -> None:
    """The tests can fail: ONNX's bytes used as they are when F is odd, swapped nibbles, or scales
    of the neighbouring block each give errors far above tolerance."""
    inputs, contract = _layer(37, 8, 2, 45, torch.float32, "int4", 32, seed=3)
    if broken == "onnx_bytes_unconverted":
        raw = onnx_bytes(contract["gate_up"]).reshape(8, H, 45)  # F = 45: the kernel's rows are 2*23 bytes
        inputs["gate_up"] = torch.from_numpy(np.pad(raw, ((0, 0), (0, 0), (0, 1))))  # the right shape
    elif broken == "nibbles_swapped":
        q = inputs["down"]
        inputs["down"] = (q >> 4) | (q << 4)
    else:
        inputs["gate_up_scale"] = inputs["gate_up_scale"].roll(1, dims=1)
    out = K.fused_moe_quantized(**inputs, bits=4, block_size=32)
    assert _error(out, _reference(inputs, contract, 32)) > 100 * TOL[torch.float32]


def test_quantized_moe_in_a_workspace_and_empty() -> None:
    """What the TensorRT plugin does: scratch from its workspace (garbage-filled), result into its output."""
    inputs, _ = _layer(37, 8, 2, 45, torch.float16, "int4-zp", 64, seed=4)
    need = K.moe_scratch_bytes(37, H, 45, 8, 2, "float16")
    workspace = torch.full((need,), 0xA5, dtype=torch.uint8)
    out = torch.empty(37, H, dtype=torch.float16)
    assert K.fused_moe_quantized(**inputs, bits=4, block_size=64, workspace=workspace, out=out) is out
    assert torch.equal(out, K.fused_moe_quantized(**inputs, bits=4, block_size=64))
    empty = dict(inputs, hidden=inputs["hidden"][:0], weights=inputs["weights"][:0], ids=inputs["ids"][:0])
    assert K.fused_moe_quantized(**empty, bits=4, block_size=64).shape == (0, H)


def test_quantized_moe_input_errors() -> None:
    inputs, _ = _layer(4, 8, 2, 45, torch.float32, "int4", 32)
    with pytest.raises(MixportError, match="gate_up has the wrong shape"):
        K.fused_moe_quantized(**inputs, bits=8, block_size=32)  # int4 bytes are not int8 values
    with pytest.raises(MixportError, match="gate_up_scale has the wrong shape"):
        K.fused_moe_quantized(**inputs, bits=4, block_size=64)  # scales of another block size
    with pytest.raises(MixportError, match="unsupported block size"):
        K.fused_moe_quantized(**inputs, bits=4, block_size=8)
    with pytest.raises(MixportError, match="zero points come in pairs"):
        K.fused_moe_quantized(**dict(inputs, gate_up_zero=inputs["gate_up"][:, :3]), bits=4, block_size=32)
    with pytest.raises(MixportError, match="gate_up_scale has the wrong dtype"):
        K.fused_moe_quantized(**dict(inputs, gate_up_scale=inputs["gate_up_scale"].half()), bits=4,
                              block_size=32)
    int8, _ = _layer(4, 8, 2, 45, torch.float32, "int8", 32)
    with pytest.raises(MixportError, match="gate_up has the wrong dtype"):
        K.fused_moe_quantized(**dict(int8, gate_up=int8["gate_up"].view(torch.uint8)), bits=8, block_size=32)
