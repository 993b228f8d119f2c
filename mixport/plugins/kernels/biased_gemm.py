"""The grouped GEMMs of the MoE contract's version "3" (ops.py, GPT-OSS): expert biases and the
clamped SwiGLU. Same grid, slots and fp32 accumulation as ``grouped_gemm`` (whose reduce kernel
finishes the layer); kept apart so the version-"1" kernels and their AOT signatures stay as they are.

# T tokens, E experts, H hidden, F intermediate, k active, P = T*k pairs, BM = BLOCK_M

* ``biased_gate_up_kernel``: g = x @ gate_e + bg_e, u = x @ up_e + bu_e (gate_up_bias [E, 2F], gate
  first); CLAMPED: (clamp(u, -limit, limit) + 1) * c * sigmoid(alpha * c), c = min(g, limit); else
  silu(g) * u; fp32, stored in the input dtype -> inter [P, F].
* ``biased_down_kernel``: partial[p] = weights.flat[p] * (inter[p] @ down_e + bd_e), fp32 -> [P, H].
"""

from __future__ import annotations

import triton.language as tl

from mixport.plugins.kernels._runtime import kernel


@kernel
def biased_gate_up_kernel(
    hidden_ptr,              # [T, H]
    gate_up_ptr,             # [E, H, 2F]
    bias_ptr,                # [E, 2F]
    inter_ptr,               # [P, F] out, hidden dtype
    sorted_ptr,              # [max_padded] int32
    expert_ids_ptr,          # [max_blocks] int32
    num_post_ptr,            # [1] int32
    P,
    H,
    F,
    alpha,                   # fp32 (CLAMPED)
    limit,                   # fp32 (CLAMPED)
    TOP_K: tl.constexpr,
    CLAMPED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))     # [BM]
    row_ok = pairs < P
    tokens = (pairs // TOP_K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                            # [BN]
    col_ok = cols < F
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = hidden_ptr + tokens[:, None] * H + ks[None, :]                   # [BM, BK]
    g_ptrs = gate_up_ptr + expert * H * 2 * F + ks[:, None] * (2 * F) + cols[None, :]
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = (k0 + ks) < H
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = k_ok[:, None] & col_ok[None, :]
        g = tl.load(g_ptrs, mask=w_ok, other=0.0)
        u = tl.load(g_ptrs + F, mask=w_ok, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            g = g.to(tl.float32)
            u = u.to(tl.float32)
        acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * 2 * F
    b_ptrs = bias_ptr + expert * 2 * F + cols
    acc_g += tl.load(b_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc_u += tl.load(b_ptrs + F, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if CLAMPED:
        c = tl.minimum(acc_g, limit)
        act = (tl.minimum(tl.maximum(acc_u, -limit), limit) + 1.0) * (c / (1.0 + tl.exp(-alpha * c)))
    else:
        act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    out_ptrs = inter_ptr + pairs.to(tl.int64)[:, None] * F + cols[None, :]
    tl.store(out_ptrs, act.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@kernel
def biased_down_kernel(
    inter_ptr,               # [P, F]
    down_ptr,                # [E, F, H]
    bias_ptr,                # [E, H]
    weights_ptr,             # [P] routing weights (= [T, k] flat)
    partial_ptr,             # [P, H] out, fp32
    sorted_ptr,              # [max_padded] int32
    expert_ids_ptr,          # [max_blocks] int32
    num_post_ptr,            # [1] int32
    P,
    H,
    F,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = pairs < P
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                            # [BN] over H
    col_ok = cols < H
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + pairs[:, None] * F + ks[None, :]                     # [BM, BK]
    b_ptrs = down_ptr + expert * F * H + ks[:, None] * H + cols[None, :]      # [BK, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        k_ok = (k0 + ks) < F
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * H
    acc += tl.load(bias_ptr + expert * H + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    w = tl.load(weights_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * w[:, None]
    out_ptrs = partial_ptr + pairs[:, None] * H + cols[None, :]
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])
