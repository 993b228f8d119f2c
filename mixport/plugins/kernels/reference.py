"""NumPy float64 references for routing and the MoE layer: the test oracle.

# T tokens, E experts, H hidden, F intermediate, k active

Inputs may be NumPy arrays or torch tensors (any float dtype, any device);
everything is converted to float64 before any arithmetic.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


def as_f64(x: Any) -> F64:
    """A float64 NumPy copy of an array or torch tensor (bf16 included)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _softmax(x: F64) -> F64:
    p = np.exp(x - x.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def reference_routing(logits: Any, k: int, normalization: str = "renormalize",
                      order: str = "softmax_topk", *, scoring: str = "softmax", bias: Any = None,
                      n_group: int = 1, topk_group: int = 1, group_score: str = "max",
                      scaling: float = 1.0, eps: float = 0.0) -> tuple[F64, I64]:
    """The TopKRouting contract (``ops.py``) in float64; ties: lower index first.

    softmax -> top-k -> optional renormalize; order ``topk_softmax``: top-k of the logits ->
    softmax over the k -> optional renormalize; ``scoring`` sigmoid, a selection-only ``bias``
    [E], grouped top-k (``n_group`` / ``topk_group`` / ``group_score``), ``scaling`` x the
    weights; ``scoring`` sparsemixer: PhiMoE's two rounds with threshold ``eps``."""
    x = as_f64(logits)                                   # [T, E]
    if scoring == "sparsemixer":
        w, ids = _sparsemixer(x, eps)
    else:
        if order not in ("softmax_topk", "topk_softmax"):
            raise ValueError(f"order must be 'softmax_topk' or 'topk_softmax', got {order!r}")
        scores = 1.0 / (1.0 + np.exp(-x)) if scoring == "sigmoid" else (
            x if order == "topk_softmax" else _softmax(x))
        choice = scores if bias is None else scores + as_f64(bias)[None, :]
        if n_group > 1:
            choice = _group_mask(choice, n_group, topk_group, group_score)
        ids = np.argsort(-choice, axis=1, kind="stable")[:, :k]  # [T, k]
        w = np.take_along_axis(scores, ids, axis=1)
        if order == "topk_softmax":
            w = _softmax(w)
        if normalization == "renormalize":
            w = w / (w.sum(axis=1, keepdims=True) + (1e-20 if scoring == "sigmoid" else 0.0))
        elif normalization != "none":
            raise ValueError(f"normalization must be 'renormalize' or 'none', got {normalization!r}")
    return w * scaling, ids.astype(np.int64)


def _group_mask(choice: F64, n_group: int, topk_group: int, group_score: str) -> F64:
    t, e = choice.shape
    grouped = choice.reshape(t, n_group, e // n_group)
    if group_score == "top2_sum":
        scores = -np.sort(-grouped, axis=2)[:, :, :2].sum(axis=2)   # [T, G]
    else:
        scores = grouped.max(axis=2)
    kept = np.argsort(-scores, axis=1, kind="stable")[:, :topk_group]
    keep = np.zeros_like(scores, dtype=bool)
    np.put_along_axis(keep, kept, True, axis=1)
    return np.where(np.repeat(keep, e // n_group, axis=1), choice, -np.inf)


def _sparsemixer(x: F64, eps: float) -> tuple[F64, I64]:
    """PhiMoE's inference routing (top-2), see ``ops.py``."""
    def round_(gates: F64) -> tuple[I64, F64]:
        idx = np.argmax(gates, axis=1)[:, None]            # first among equal maxima
        top = np.take_along_axis(gates, idx, axis=1)
        far = (top - x) / np.maximum(np.abs(x), top) > 2 * eps
        return idx, np.take_along_axis(_softmax(np.where(far, -np.inf, gates)), idx, axis=1)

    id1, w1 = round_(x)
    rest = x.copy()
    np.put_along_axis(rest, id1, -np.inf, axis=1)
    id2, w2 = round_(rest)
    return np.concatenate([w1, w2], axis=1), np.concatenate([id1, id2], axis=1)


def reference_expert(x: F64, gate_up: F64, down: F64, gate_up_bias: F64 | None = None,
                     down_bias: F64 | None = None, activation: str = "swiglu", alpha: float = 1.702,
                     limit: float = 7.0) -> F64:
    """SwiGLU FFN of one expert: (silu(x @ gate) * (x @ up)) @ down, float64; with the biases
    added after each projection, and ``swiglu_clamped``: (clip(up, -limit, limit) + 1) * c *
    sigmoid(alpha * c), c = min(gate, limit) (ops.py, plugin_version "3")."""
    f = gate_up.shape[1] // 2
    h = x @ gate_up + (0.0 if gate_up_bias is None else gate_up_bias)  # [n, 2F]
    gate, up = h[:, :f], h[:, f:]
    if activation == "swiglu_clamped":
        c = np.minimum(gate, limit)
        act = (np.clip(up, -limit, limit) + 1.0) * c / (1.0 + np.exp(-alpha * c))
    elif activation == "swiglu":
        act = gate / (1.0 + np.exp(-gate)) * up
    else:
        raise ValueError(f"activation must be 'swiglu' or 'swiglu_clamped', got {activation!r}")
    return act @ down + (0.0 if down_bias is None else down_bias)  # [n, H]


def reference_moe(hidden: Any, weights: Any, ids: Any, gate_up: Any, down: Any, gate_up_bias: Any = None,
                  down_bias: Any = None, activation: str = "swiglu", alpha: float = 1.702,
                  limit: float = 7.0) -> F64:
    """out[t] = sum_j weights[t, j] * FFN_{ids[t, j]}(hidden[t]), float64 [T, H]; biases [E, 2F] / [E, H]."""
    x, w = as_f64(hidden), as_f64(weights)               # [T, H], [T, k]
    wu, wd = as_f64(gate_up), as_f64(down)               # [E, H, 2F], [E, F, H]
    bu = None if gate_up_bias is None else as_f64(gate_up_bias)
    bd = None if down_bias is None else as_f64(down_bias)
    idx = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids, dtype=np.int64)
    out = np.zeros_like(x)
    for e in np.unique(idx):
        if not 0 <= e < wu.shape[0]:
            continue
        tok, slot = np.nonzero(idx == e)
        y = reference_expert(x[tok], wu[e], wd[e], None if bu is None else bu[e], None if bd is None else bd[e],
                             activation, alpha, limit)
        np.add.at(out, tok, w[tok, slot, None] * y)
    return out


def as_array(x: Any) -> np.ndarray:
    """A NumPy array of an array or torch tensor, its dtype kept (torch bf16 -> ml_dtypes bfloat16)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            import ml_dtypes
            import torch

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def reference_moe_quantized(hidden: Any, weights: Any, ids: Any, gate_up: Any, down: Any,
                            gate_up_scale: Any, down_scale: Any, gate_up_zero: Any = None,
                            down_zero: Any = None, *, block_size: int, **extension: Any) -> F64:
    """The quantized ``MoE`` contract (``ops.py``, plugin_version "2"), float64 [T, H].

    gate_up [E, H, 2F] / down [E, F, H] hold the quantized values one per element (int8, or
    ml_dtypes int4 / uint4, as ``quant.quantize`` returns them), scales [E, ceil(in/B), out] in
    the float type, zero points (uint4 weights only) shaped like the scales. Each expert's
    weights are ONNX's blocked DequantizeLinear along the input axis (``quant.dequantize``:
    fp32 arithmetic, rounded to the scale's type), then ``reference_moe`` runs on them: by
    construction equal to the float reference on the dequantized weights. ``extension``: a
    version-"3" node's gate_up_bias, down_bias, activation, alpha, limit (``reference_moe``).
    """
    from mixport.quant import dequantize

    def weight(q: Any, scale: Any, zero: Any) -> np.ndarray:
        z = None if zero is None else as_array(zero)
        return dequantize(as_array(q), as_array(scale), z, axis=1, block_size=block_size)

    return reference_moe(hidden, weights, ids, weight(gate_up, gate_up_scale, gate_up_zero),
                         weight(down, down_scale, down_zero), **extension)


def reference_align(ids: Any, num_experts: int, block_m: int) -> tuple[I64, I64, int]:
    """NumPy model of ``moe_align_block_size``: (sorted_token_ids, expert_ids, num_post).

    Stable grouping by expert, segments padded to multiples of ``block_m``,
    sentinel P = ids.size, expert_ids -1 for blocks past num_post; pairs
    with ids outside [0, E) are dropped.
    """
    flat = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids, dtype=np.int64).reshape(-1)
    p = flat.size
    max_padded = p + num_experts * (block_m - 1)
    sorted_ids = np.full(max_padded, p, dtype=np.int64)
    expert_ids = np.full(-(-max_padded // block_m), -1, dtype=np.int64)
    pos = 0
    for e in range(num_experts):
        members = np.nonzero(flat == e)[0]
        sorted_ids[pos:pos + members.size] = members
        padded = -(-members.size // block_m) * block_m
        expert_ids[pos // block_m:(pos + padded) // block_m] = e
        pos += padded
    return sorted_ids, expert_ids, pos
