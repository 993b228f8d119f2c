"""Grouped GEMMs over expert-sorted pairs: gate/up + SwiGLU, down + routing weight, reduce.

# T tokens, E experts, H hidden, F intermediate, k active, P = T*k pairs, BM = BLOCK_M

Both GEMM kernels run on the grid (max_blocks, cdiv(N, BLOCK_N)): program
(m, n) takes the BM pair slots ``sorted_token_ids[m*BM : (m+1)*BM]`` (all
routed to ``expert_ids[m]``; sentinel slots are masked) and BLOCK_N output
columns. Blocks at or past ``num_tokens_post_padded`` exit at once.

* ``gate_up_kernel``: inter[p] = silu(x[p // k] @ gate_e) * (x[p // k] @ up_e)
  with gate_e = gate_up[e, :, :F], up_e = gate_up[e, :, F:]; fp32 accumulate,
  SwiGLU in fp32, stored in the input dtype -> inter [P, F].
* ``down_kernel``: partial[p] = weights.flat[p] * (inter[p] @ down_e), fp32
  -> partial [P, H].
* ``reduce_kernel``: out[t] = sum_{j<k} partial[t*k + j] in fixed j order,
  fp32, cast to the hidden dtype. No atomics: the result is bit-for-bit
  deterministic run to run. Slots whose id is outside [0, E) contribute 0.

UPCAST converts tiles to fp32 before ``tl.dot`` (the CPU interpreter gets bf16
dots wrong); PRECISION is the fp32 dot mode ("ieee" for parity, "tf32" fast).
"""

from __future__ import annotations

import triton.language as tl

from mixport.plugins.kernels._runtime import kernel


@kernel
def gate_up_kernel(
    hidden_ptr,              # [T, H]
    gate_up_ptr,             # [E, H, 2F]
    inter_ptr,               # [P, F] out, hidden dtype
    sorted_ptr,              # [max_padded] int32
    expert_ids_ptr,          # [max_blocks] int32
    num_post_ptr,            # [1] int32
    P,                       # pairs = T*k
    H,
    F,
    TOP_K: tl.constexpr,
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
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    out_ptrs = inter_ptr + pairs.to(tl.int64)[:, None] * F + cols[None, :]
    tl.store(out_ptrs, act.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@kernel
def down_kernel(
    inter_ptr,               # [P, F]
    down_ptr,                # [E, F, H]
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
    w = tl.load(weights_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * w[:, None]
    out_ptrs = partial_ptr + pairs[:, None] * H + cols[None, :]
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])


@kernel
def reduce_kernel(
    partial_ptr,             # [P, H] fp32
    ids_ptr,                 # [P] int64
    out_ptr,                 # [T, H] out, hidden dtype
    H,
    E,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + t * TOP_K + j)
        live = (e >= 0) & (e < E)
        v = tl.load(partial_ptr + (t * TOP_K + j) * H + cols, mask=col_ok, other=0.0)
        acc += tl.where(live, v, 0.0)         # rows of dropped slots were never written
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)
