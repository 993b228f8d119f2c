"""``fused_moe_quantized``: the quantized ``MoE`` (plugin_version "2") on the Triton kernels.

# T tokens, E experts, H hidden, F intermediate, k active, B block size

Weights in the kernel layout (``qlayout``; int8 is the contract's own):

    bits 8:  gate_up int8 [E, H, 2F]               down int8 [E, F, H]
    bits 4:  gate_up uint8 [E, H, 2*ceil(F/2)]     down uint8 [E, F, ceil(H/2)]
             (int4 packed, signed; uint4 when zero points are given)
    gate_up_scale [E, ceil(H/B), 2F], down_scale [E, ceil(F/B), H]: hidden's dtype
    gate_up_zero uint8 [E, ceil(H/B), 2*ceil(F/2)], down_zero uint8 [E, ceil(F/B), ceil(H/2)]
             (bits 4 with zero points only; packed like the weights)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mixport.plugins.kernels._runtime import cdiv
from mixport.plugins.kernels.api import FLOAT_DTYPES, _check, _check_shape, _dtype_name, _torch, run_moe
from mixport.plugins.kernels.configs import quant_gemm_config
from mixport.plugins.kernels.qlayout import SEGMENTS, packed_row_bytes

if TYPE_CHECKING:
    from torch import Tensor


def quant_shapes(e: int, h: int, f: int, bits: int, block_size: int, zero: bool) -> dict[str, tuple[int, ...]]:
    """The kernel-layout shape of every quantized input (``zero``: with zero-point inputs)."""
    gu_n, dn_n = (2 * f, h) if bits == 8 else (packed_row_bytes(2 * f, SEGMENTS["gate_up"]),
                                               packed_row_bytes(h, SEGMENTS["down"]))
    nb_h, nb_f = cdiv(h, block_size), cdiv(f, block_size)
    shapes = {"gate_up": (e, h, gu_n), "down": (e, f, dn_n),
              "gate_up_scale": (e, nb_h, 2 * f), "down_scale": (e, nb_f, h)}
    if zero:
        shapes.update(gate_up_zero=(e, nb_h, gu_n), down_zero=(e, nb_f, dn_n))
    return shapes


def _check_quant(hidden: Tensor, weights: Tensor, ids: Tensor, tensors: dict[str, Tensor | None],
                 bits: int, block_size: int) -> tuple[int, int, int, int, int]:
    torch = _torch()
    _check(bits in (8, 4), "unsupported bit width", bits, "8 | 4")
    _check(block_size >= 16 and not block_size & (block_size - 1), "unsupported block size", block_size,
           "a power of two >= 16")
    _check(hidden.dim() == 2, "hidden must be 2-D [T, H]", tuple(hidden.shape), "[T, H]")
    scale = tensors["gate_up_scale"]
    assert scale is not None
    _check(scale.dim() == 3 and scale.shape[2] % 2 == 0, "gate_up_scale must be [E, ceil(H/B), 2F]",
           tuple(scale.shape), "[E, ceil(H/B), 2F]")
    (t, h), e, f = hidden.shape, scale.shape[0], scale.shape[2] // 2
    _check(ids.dim() == 2 and ids.shape[0] == t, "ids must be [T, k]", tuple(ids.shape), f"[{t}, k]")
    k = ids.shape[1]
    _check_shape(weights, "weights", (t, k))
    _check(ids.dtype == torch.int64, "ids must be int64", ids.dtype, "torch.int64")
    _check(_dtype_name(hidden) in FLOAT_DTYPES, "hidden dtype", hidden.dtype, FLOAT_DTYPES)
    zero = tensors["gate_up_zero"] is not None
    _check(zero == (tensors["down_zero"] is not None), "zero points come in pairs (gate_up_zero, down_zero)",
           zero, "both or neither")
    _check(not zero or bits == 4, "zero points need 4-bit (uint4) weights", bits, 4)
    qtype = torch.int8 if bits == 8 else torch.uint8
    for name, shape in quant_shapes(e, h, f, bits, block_size, zero).items():
        tensor = tensors[name]
        assert tensor is not None
        _check_shape(tensor, name, shape)
        want = hidden.dtype if name.endswith("scale") else qtype if name in ("gate_up", "down") else torch.uint8
        _check(tensor.dtype == want, f"{name} has the wrong dtype", tensor.dtype, want)
        _check(tensor.device == hidden.device, f"{name} is on another device", str(tensor.device),
               str(hidden.device))
    return t, h, f, e, k


def fused_moe_quantized(hidden: Tensor, weights: Tensor, ids: Tensor, gate_up: Tensor, down: Tensor,
                        gate_up_scale: Tensor, down_scale: Tensor, gate_up_zero: Tensor | None = None,
                        down_zero: Tensor | None = None, *, bits: int, block_size: int,
                        block_m: int | None = None, workspace: Tensor | None = None,
                        out: Tensor | None = None) -> Tensor:
    """``fused_moe`` on quantized experts: each K tile of expert weights is dequantized
    ((q - zero) * scale, fp32, rounded to hidden's dtype: ONNX's blocked DequantizeLinear) right
    before ``tl.dot``; fp32 accumulation, the same workspace and determinism as ``fused_moe``."""
    from mixport.plugins.kernels import quant_gemm as qg

    named = {"gate_up": gate_up, "down": down, "gate_up_scale": gate_up_scale, "down_scale": down_scale,
             "gate_up_zero": gate_up_zero, "down_zero": down_zero}
    t, h, f, e, k = _check_quant(hidden, weights, ids, named, bits, block_size)
    q = {name: None if x is None else x.contiguous() for name, x in named.items()}
    hidden, has_zero = hidden.contiguous(), gate_up_zero is not None
    quant = {"BITS": bits, "HAS_ZERO": has_zero, "QBLOCK": block_size}

    def gemms(grid_m: int, index: tuple[Tensor, ...], inter: Tensor, partial: Tensor, flat_w: Tensor,
              opts: dict[str, Any]) -> None:
        gz = q["gate_up_zero"] if has_zero else q["gate_up"]  # an unused pointer without zero points
        dz = q["down_zero"] if has_zero else q["down"]
        qg.qgate_up_kernel.launch((grid_m, cdiv(f, opts["BLOCK_N"])), hidden, q["gate_up"], q["gate_up_scale"],
                                  gz, inter, *index, t * k, h, f, TOP_K=k, **opts, **quant)
        qg.qdown_kernel.launch((grid_m, cdiv(h, opts["BLOCK_N"])), inter, q["down"], q["down_scale"], dz, flat_w,
                               partial, *index, t * k, h, f, **opts, **quant)

    dtype = _dtype_name(hidden)
    return run_moe(hidden, weights, ids, (e, f, k), gemms,
                   lambda bm, interpret: quant_gemm_config(bm, dtype, block_size, interpret=interpret),
                   block_m=block_m, workspace=workspace, out=out)
