"""Sparse expert dispatch kernels (Triton) for the mixport ``TopKRouting`` and ``MoE`` ops.

# T tokens, E experts, H hidden, F intermediate, k active

Public API (torch and triton are imported only when a function is called)::

    topk_routing(logits, k, normalization="renormalize", order="softmax_topk", *, out=None) -> (weights, ids)
    moe_align_block_size(ids, num_experts, block_m, *, out=None) -> (sorted_token_ids, expert_ids, num_post)
    fused_moe(hidden, weights, ids, gate_up, down, *, block_m=None, workspace=None, out=None) -> out
    fused_moe_biased(hidden, weights, ids, gate_up, down, gate_up_bias, down_bias,
                     activation="swiglu_clamped", alpha=1.702, limit=7.0, ...) -> out   # version "3"
    fused_moe_quantized(hidden, weights, ids, gate_up, down, gate_up_scale, down_scale,
                        gate_up_zero=None, down_zero=None, *, bits, block_size, ...) -> out
    from_onnx_int4(packed, shape, segments) -> the int4 kernel layout (``qlayout``)
    moe_scratch_bytes(tokens, hidden, ffn, experts, k, dtype) -> bytes of fused_moe's workspace
    moe_workspace_bytes(max_tokens, hidden, ffn, experts, k, dtype) -> bytes for 1..max_tokens
    reference_routing(logits, k, normalization="renormalize", order="softmax_topk") -> (weights, ids)  # f64
    reference_moe(hidden, weights, ids, gate_up, down) -> out                     # numpy f64
    reference_moe_quantized(hidden, ..., gate_up_scale, down_scale, [zeros], block_size=B)  # numpy f64

Layouts follow ``mixport.ops``: gate_up [E, H, 2F] (gate | up), down [E, F, H].
"""

from __future__ import annotations

from mixport.errors import KernelDependencyError, KernelInputError
from mixport.plugins.kernels.api import fused_moe, fused_moe_biased, moe_align_block_size, topk_routing
from mixport.plugins.kernels.qlayout import from_onnx_int4
from mixport.plugins.kernels.quant_api import fused_moe_quantized
from mixport.plugins.kernels.reference import reference_moe, reference_moe_quantized, reference_routing
from mixport.plugins.kernels.workspace import moe_scratch_bytes, moe_workspace_bytes

__all__ = [
    "KernelDependencyError",
    "KernelInputError",
    "from_onnx_int4",
    "fused_moe",
    "fused_moe_biased",
    "fused_moe_quantized",
    "moe_align_block_size",
    "moe_scratch_bytes",
    "moe_workspace_bytes",
    "reference_moe",
    "reference_moe_quantized",
    "reference_routing",
    "topk_routing",
]
