"""Torch-level entry points: validate, allocate, launch the Triton kernels.

# T tokens, E experts, H hidden, F intermediate, k active, P = T*k pairs

CUDA tensors launch compiled kernels; CPU tensors run the same kernels in the
Triton interpreter (slow; meant for tests and debugging).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mixport.errors import KernelInputError
from mixport.ops import ACTIVATIONS, NORMALIZATIONS, ORDERS, SWIGLU_ALPHA, SWIGLU_LIMIT
from mixport.plugins.kernels._runtime import cdiv, interpret_mode, require
from mixport.plugins.kernels.configs import REDUCE_BLOCK_H, choose_block_m, gemm_config
from mixport.plugins.kernels.workspace import Slice, carve, scratch_bytes, scratch_layout

if TYPE_CHECKING:
    from torch import Tensor

FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def _torch() -> Any:
    return require("torch", "the kernel wrappers")


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _check(cond: bool, what: str, given: object, expected: object) -> None:
    if not cond:
        raise KernelInputError(what, given=given, expected=expected)


def _check_shape(t: Tensor, name: str, shape: tuple[int, ...]) -> None:
    _check(tuple(t.shape) == shape, f"{name} has the wrong shape", tuple(t.shape), shape)


def _interpret(t: Tensor) -> bool:
    """True for the CPU interpreter; checks that tensors sit where the kernels run."""
    interpret = interpret_mode()
    on_cpu = t.device.type == "cpu"
    if on_cpu != interpret:
        raise KernelInputError(
            "tensor device does not match the Triton launch mode", given=str(t.device),
            expected="CPU tensors with TRITON_INTERPRET=1, GPU tensors without it",
            hint="set TRITON_INTERPRET=1 before importing triton to run on CPU")
    return interpret


def _check_out(t: Tensor, name: str, like: Tensor, shape: tuple[int, ...], dtype: Any) -> None:
    """An ``out=`` tensor: the shape, dtype and device the kernel writes, contiguous."""
    _check_shape(t, name, shape)
    _check(t.dtype == dtype, f"{name} has the wrong dtype", t.dtype, dtype)
    _check(t.device == like.device, f"{name} is on the wrong device", str(t.device), str(like.device))
    _check(t.is_contiguous(), f"{name} must be contiguous", tuple(t.stride()), "contiguous")


def topk_routing(logits: Tensor, k: int, normalization: str = "renormalize", order: str = ORDERS[0], *,
                 scoring: str = "softmax", bias: Tensor | None = None, n_group: int = 1, topk_group: int = 1,
                 group_score: str = "max", scaling: float = 1.0, eps: float = 0.0,
                 out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Router logits [T, E] -> (weights [T, k] in logits dtype, ids [T, k] int64): the TopKRouting
    contract (``ops.py``), version 3 included.

    In fp32: order "softmax_topk" takes the softmax over E, then the top k by descending
    weight; "topk_softmax" the top k logits, then the softmax over those k (ties: lower
    expert first in both); then "renormalize" (divide by the top-k sum) or "none". ``scoring``
    sigmoid / sparsemixer, a selection-only ``bias`` [E], grouped top-k and ``scaling`` as the
    contract says. ``out``: the (weights, ids) tensors to write (a TensorRT plugin's outputs); no
    scratch is needed.
    """
    torch = _torch()
    import numpy as np

    from mixport.ops import RoutingSpec
    from mixport.plugins.kernels.routing import routing_meta, topk_routing_kernel

    _check(logits.dim() == 2, "logits must be 2-D [T, E]", tuple(logits.shape), "[T, E]")
    _check(_dtype_name(logits) in FLOAT_DTYPES, "logits dtype", logits.dtype, FLOAT_DTYPES)
    _check(normalization in NORMALIZATIONS, "unknown normalization", normalization, NORMALIZATIONS)
    _check(order in ORDERS, "unknown routing order", order, ORDERS)
    t, e = logits.shape
    _check(1 <= k <= e, "k must be in [1, E]", k, f"1..{e}")
    spec = RoutingSpec(k, normalization, order, scoring, bias is not None, n_group, topk_group, group_score,
                       scaling, eps)
    why = spec.problem(e)
    _check(why is None, "inconsistent routing", why, "a TopKRouting the contract defines")
    if bias is not None:
        _check(tuple(bias.shape) == (e,) and bias.device == logits.device, "bias must be [E] on the logits' device",
               tuple(bias.shape), f"({e},)")
    logits = logits.contiguous()
    if out is None:
        weights = torch.empty((t, k), dtype=logits.dtype, device=logits.device)
        ids = torch.empty((t, k), dtype=torch.int64, device=logits.device)
    else:
        weights, ids = out
        _check_out(weights, "out weights", logits, (t, k), logits.dtype)
        _check_out(ids, "out ids", logits, (t, k), torch.int64)
    if t == 0:
        return weights, ids
    _interpret(logits)
    meta = routing_meta(e, k, n_group)
    bias_arg = logits if bias is None else bias.contiguous()  # never read without HAS_BIAS
    topk_routing_kernel.launch((cdiv(t, meta["BLOCK_T"]),), logits, weights, ids, bias_arg, t, e,
                               float(np.float32(scaling)), float(np.float32(2 * eps)),
                               K=k, RENORMALIZE=normalization == "renormalize",
                               TOPK_FIRST=order == "topk_softmax", SCORING=("softmax", "sigmoid",
                                                                            "sparsemixer").index(scoring),
                               HAS_BIAS=bias is not None, N_GROUP=n_group, TOPK_GROUP=topk_group,
                               GROUP_TOP2=group_score == "top2_sum", GROUP_SIZE=e // n_group, **meta)
    return weights, ids


def moe_align_block_size(ids: Tensor, num_experts: int, block_m: int, *,
                         out: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Group pairs by expert in block_m-aligned segments (see ``align`` module).

    Returns (sorted_token_ids [P + E*(block_m-1)], expert_ids [cdiv(., block_m)],
    num_tokens_post_padded [1]), all int32; the sentinel is P = ids.numel().
    ``out``: those three tensors, to write instead of allocating.
    """
    torch = _torch()
    from mixport.plugins.kernels.align import align_meta, align_sizes, moe_align_kernel

    _check(ids.dtype == torch.int64, "ids must be int64", ids.dtype, "torch.int64")
    _check(num_experts >= 1, "num_experts must be positive", num_experts, ">= 1")
    _check(block_m >= 1, "block_m must be positive", block_m, ">= 1")
    flat = ids.contiguous().view(-1)
    p = flat.numel()
    max_padded, max_blocks = align_sizes(p, num_experts, block_m)
    dev = ids.device
    _interpret(ids)
    if out is None:
        out = tuple(torch.empty(n, dtype=torch.int32, device=dev) for n in (max_padded, max_blocks, 1))
    for tensor, name, n in zip(out, ("sorted_token_ids", "expert_ids", "num_tokens_post_padded"),
                               (max_padded, max_blocks, 1), strict=True):
        _check_out(tensor, name, ids, (n,), torch.int32)
    sorted_ids, expert_ids, num_post = out
    moe_align_kernel.launch((1,), flat, sorted_ids, expert_ids, num_post, p, num_experts,
                            max_padded, max_blocks,
                            **align_meta(num_experts, block_m))
    return sorted_ids, expert_ids, num_post


def _check_moe(hidden: Tensor, weights: Tensor, ids: Tensor, gate_up: Tensor,
               down: Tensor) -> tuple[int, int, int, int, int]:
    torch = _torch()
    _check(hidden.dim() == 2, "hidden must be 2-D [T, H]", tuple(hidden.shape), "[T, H]")
    _check(gate_up.dim() == 3, "gate_up must be 3-D [E, H, 2F]", tuple(gate_up.shape), "[E, H, 2F]")
    t, h = hidden.shape
    e, f2 = gate_up.shape[0], gate_up.shape[2]
    _check(ids.dim() == 2 and ids.shape[0] == t, "ids must be [T, k]", tuple(ids.shape), f"[{t}, k]")
    k, f = ids.shape[1], f2 // 2
    _check(f2 % 2 == 0, "gate_up's last dim must be even (gate | up)", f2, "2F")
    _check_shape(gate_up, "gate_up", (e, h, 2 * f))
    _check_shape(down, "down", (e, f, h))
    _check_shape(weights, "weights", (t, k))
    _check(ids.dtype == torch.int64, "ids must be int64", ids.dtype, "torch.int64")
    _check(_dtype_name(hidden) in FLOAT_DTYPES, "hidden dtype", hidden.dtype, FLOAT_DTYPES)
    same = {hidden.dtype, gate_up.dtype, down.dtype}
    _check(len(same) == 1, "hidden, gate_up and down must share a dtype", same, "one dtype")
    devices = {str(x.device) for x in (hidden, weights, ids, gate_up, down)}
    _check(len(devices) == 1, "all inputs must be on one device", devices, "one device")
    return t, h, f, e, k


def fused_moe(hidden: Tensor, weights: Tensor, ids: Tensor, gate_up: Tensor, down: Tensor,
              *, block_m: int | None = None, workspace: Tensor | None = None,
              out: Tensor | None = None) -> Tensor:
    """MoE layer: out [T, H] = sum_j weights[t, j] * FFN_{ids[t, j]}(hidden[t]).

    FFN_e(x) = (silu(x @ gate_up[e][:, :F]) * (x @ gate_up[e][:, F:])) @ down[e].
    fp32 accumulation; deterministic (no atomics). ``block_m`` (power of two
    >= 16) overrides the pairs-per-block heuristic. ``workspace``: a 1-D uint8
    buffer of at least ``moe_scratch_bytes`` (a TensorRT plugin's workspace)
    holding every intermediate; without it one such buffer is allocated.
    ``out``: the [T, H] tensor to write (a plugin's output).
    """
    from mixport.plugins.kernels import grouped_gemm as gg

    t, h, f, e, k = _check_moe(hidden, weights, ids, gate_up, down)
    hidden, gate_up, down = hidden.contiguous(), gate_up.contiguous(), down.contiguous()

    def gemms(grid_m: int, index: tuple[Tensor, ...], inter: Tensor, partial: Tensor, flat_w: Tensor,
              opts: dict[str, Any]) -> None:
        gg.gate_up_kernel.launch((grid_m, cdiv(f, opts["BLOCK_N"])), hidden, gate_up, inter, *index,
                                 t * k, h, f, TOP_K=k, **opts)
        gg.down_kernel.launch((grid_m, cdiv(h, opts["BLOCK_N"])), inter, down, flat_w, partial, *index,
                              t * k, h, f, **opts)

    return run_moe(hidden, weights, ids, (e, f, k), gemms,
                   lambda bm, interpret: gemm_config(bm, _dtype_name(hidden), interpret=interpret),
                   block_m=block_m, workspace=workspace, out=out)


def fused_moe_biased(hidden: Tensor, weights: Tensor, ids: Tensor, gate_up: Tensor, down: Tensor,
                     gate_up_bias: Tensor, down_bias: Tensor, activation: str = "swiglu_clamped",
                     alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT, *, block_m: int | None = None,
                     workspace: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """The MoE contract's version "3" (ops.py, GPT-OSS): ``fused_moe`` with the expert biases
    gate_up_bias [E, 2F] (gate first) and down_bias [E, H] added after their projections, and
    ``activation`` "swiglu_clamped" ((clamp(u, -limit, limit) + 1) * c * sigmoid(alpha * c),
    c = min(g, limit)) or "swiglu". Same workspace, determinism and ``out`` as ``fused_moe``."""
    from mixport.plugins.kernels import biased_gemm as bg

    t, h, f, e, k = _check_moe(hidden, weights, ids, gate_up, down)
    _check(activation in ACTIVATIONS, "unknown activation", activation, ACTIVATIONS)
    _check_shape(gate_up_bias, "gate_up_bias", (e, 2 * f))
    _check_shape(down_bias, "down_bias", (e, h))
    _check({gate_up_bias.device, down_bias.device} == {hidden.device}, "the biases are on the wrong device",
           {str(gate_up_bias.device), str(down_bias.device)}, str(hidden.device))
    hidden, gate_up, down = hidden.contiguous(), gate_up.contiguous(), down.contiguous()
    gate_up_bias, down_bias = gate_up_bias.contiguous(), down_bias.contiguous()

    def gemms(grid_m: int, index: tuple[Tensor, ...], inter: Tensor, partial: Tensor, flat_w: Tensor,
              opts: dict[str, Any]) -> None:
        bg.biased_gate_up_kernel.launch((grid_m, cdiv(f, opts["BLOCK_N"])), hidden, gate_up, gate_up_bias, inter,
                                        *index, t * k, h, f, float(alpha), float(limit), TOP_K=k,
                                        CLAMPED=activation == "swiglu_clamped", **opts)
        bg.biased_down_kernel.launch((grid_m, cdiv(h, opts["BLOCK_N"])), inter, down, down_bias, flat_w, partial,
                                     *index, t * k, h, f, **opts)

    return run_moe(hidden, weights, ids, (e, f, k), gemms,
                   lambda bm, interpret: gemm_config(bm, _dtype_name(hidden), interpret=interpret),
                   block_m=block_m, workspace=workspace, out=out)


def run_moe(hidden: Tensor, weights: Tensor, ids: Tensor, efk: tuple[int, int, int], gemms: Any,
            config: Any, *, block_m: int | None, workspace: Tensor | None, out: Tensor | None) -> Tensor:
    """The pipeline every MoE variant shares: align pairs by expert, ``gemms`` (gate_up then down,
    into the workspace's inter / partial), then the deterministic k-way reduce into ``out``.
    ``config(block_m, interpret) -> GemmConfig``; ``gemms(grid_m, (sorted_ids, expert_ids, num_post),
    inter, partial, flat weights, launch options)``."""
    torch = _torch()
    from mixport.plugins.kernels import grouped_gemm as gg

    (t, h), (e, f, k) = hidden.shape, efk
    if out is None:
        out = torch.empty((t, h), dtype=hidden.dtype, device=hidden.device)
    _check_out(out, "out", hidden, (t, h), hidden.dtype)
    if t == 0:
        return out
    p, interpret, dtype = t * k, _interpret(hidden), _dtype_name(hidden)
    cfg = config(block_m or choose_block_m(p, e), interpret)
    scratch = _scratch(workspace, hidden, scratch_layout(p, h, f, e, dtype, cfg.block_m))
    weights, ids = weights.contiguous().view(-1), ids.contiguous().view(-1)
    index = moe_align_block_size(
        ids, e, cfg.block_m, out=(scratch["sorted_ids"], scratch["expert_ids"], scratch["num_post"]))
    upcast = interpret and dtype == "bfloat16"
    precision = "ieee" if dtype == "float32" or upcast else "tf32"
    opts: dict[str, Any] = {"UPCAST": upcast, "PRECISION": precision, **cfg.constexprs()}
    if not interpret:
        opts.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    gemms(index[1].numel(), index, scratch["inter"], scratch["partial"], weights, opts)
    gg.reduce_kernel.launch((t, cdiv(h, REDUCE_BLOCK_H)), scratch["partial"], ids, out, h, e, TOP_K=k,
                            BLOCK_H=REDUCE_BLOCK_H)
    return out


def _scratch(workspace: Tensor | None, like: Tensor, layout: list[Slice]) -> dict[str, Tensor]:
    """``layout``'s tensors carved from ``workspace`` (checked) or from one new buffer."""
    torch = _torch()
    need = scratch_bytes(layout)
    if workspace is None:
        workspace = torch.empty(need, dtype=torch.uint8, device=like.device)
    _check(workspace.dtype == torch.uint8 and workspace.dim() == 1 and workspace.is_contiguous(),
           "workspace must be a contiguous 1-D uint8 tensor", (workspace.dtype, tuple(workspace.shape)),
           "torch.uint8 [bytes]")
    _check(workspace.device == like.device, "workspace is on the wrong device", str(workspace.device),
           str(like.device))
    _check(workspace.numel() >= need, "workspace is too small", workspace.numel(), f">= {need} bytes")
    return carve(workspace, layout)
