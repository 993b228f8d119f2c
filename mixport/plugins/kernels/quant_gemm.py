"""Grouped GEMMs over quantized experts: gate/up + SwiGLU and down, dequantized in the inner loop.

# T tokens, E experts, H hidden, F intermediate, k active, P = T*k pairs, B = QBLOCK

The same grid, pair sorting and epilogues as ``grouped_gemm`` (the reduce kernel
is shared); only the weight tile differs. Each K step loads the quantized tile,
dequantizes it to the hidden dtype exactly as ONNX's blocked DequantizeLinear
does ((q - zero) * scale in fp32, rounded to the scale's type), then ``tl.dot``
accumulates in fp32 as the float kernels do:

* BITS 8: q int8 [E, K, N] (N = 2F for gate_up, H for down).
* BITS 4: q uint8 segment-packed [E, K, S*ceil(N/S/2)] (``qlayout``): a
  [BLOCK_K, BLOCK_N/2] byte tile, low / high nibbles interleaved with
  ``tl.join`` into [BLOCK_K, BLOCK_N]; signed (int4) unless HAS_ZERO (uint4,
  zero points packed the same way, [E, ceil(K/B), S*ceil(N/S/2)]).
* scale [E, ceil(K/B), N] in the hidden dtype. BLOCK_K divides B (both powers of
  two, BLOCK_K <= B, ``configs.quant_gemm_config``), so every K tile lies in one
  quantization block and needs one row of scales (and zeros); K need not be a
  multiple of B (the last block is short, its tail rows masked).

gate_up runs its K loop once per half (gate, then up: one dequantizing code path;
the hidden tile is re-read from cache), then SwiGLU as ``grouped_gemm`` does.
"""

from __future__ import annotations

import triton.language as tl

from mixport.plugins.kernels._runtime import kernel


@kernel
def qgate_up_kernel(
    hidden_ptr,              # [T, H]
    q_ptr,                   # [E, H, 2F] int8 | [E, H, 2*ceil(F/2)] uint8 (int4 packed)
    scale_ptr,               # [E, ceil(H/B), 2F] hidden dtype
    zero_ptr,                # [E, ceil(H/B), 2*ceil(F/2)] uint8 (HAS_ZERO), else any pointer
    inter_ptr,               # [P, F] out, hidden dtype
    sorted_ptr,              # [max_padded] int32
    expert_ids_ptr,          # [max_blocks] int32
    num_post_ptr,            # [1] int32
    P,
    H,
    F,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BITS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    QBLOCK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))     # [BM]
    row_ok = pairs < P
    tokens = (pairs // TOP_K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                            # [BN] within a half
    col_ok = cols < F
    hb = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)                 # [BN/2] bytes (int4)
    half_b = (F + 1) // 2                                                     # bytes per half row (int4)
    seg_q = F if BITS == 8 else half_b                                        # up's offset in a q row
    row_q = 2 * seg_q                                                         # q row length
    nblocks = (H + QBLOCK - 1) // QBLOCK
    ks = tl.arange(0, BLOCK_K)
    dt = hidden_ptr.dtype.element_ty
    for seg in tl.static_range(2):                                            # 0: gate, 1: up
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + ks
            k_ok = kk < H
            a = tl.load(hidden_ptr + tokens[:, None] * H + kk[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            q_rows = q_ptr + expert * H * row_q + kk.to(tl.int64)[:, None] * row_q + seg * seg_q
            if BITS == 8:
                q = tl.load(q_rows + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0)
                q = q.to(tl.float32)
            else:
                b = tl.load(q_rows + hb[None, :], mask=k_ok[:, None] & (hb < half_b)[None, :], other=0)
                b = b.to(tl.int32)
                lo, hi = b & 15, b >> 4
                if not HAS_ZERO:                                              # int4: 8..15 are -8..-1
                    lo, hi = lo - ((lo & 8) << 1), hi - ((hi & 8) << 1)
                q = tl.join(lo, hi).reshape(BLOCK_K, BLOCK_N).to(tl.float32)
            sblock = expert * nblocks + k0 // QBLOCK                           # one quant block per tile
            s = tl.load(scale_ptr + sblock * 2 * F + seg * F + cols, mask=col_ok, other=0.0)
            if HAS_ZERO:
                zb = tl.load(zero_ptr + sblock * row_q + seg * seg_q + hb, mask=hb < half_b, other=0)
                zb = zb.to(tl.int32)
                q = q - tl.join(zb & 15, zb >> 4).reshape(BLOCK_N).to(tl.float32)[None, :]
            w = (q * s.to(tl.float32)[None, :]).to(dt)
            if UPCAST:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if seg == 0:
            acc_g = acc
        else:
            acc_u = acc
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    out_ptrs = inter_ptr + pairs.to(tl.int64)[:, None] * F + cols[None, :]
    tl.store(out_ptrs, act.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@kernel
def qdown_kernel(
    inter_ptr,               # [P, F]
    q_ptr,                   # [E, F, H] int8 | [E, F, ceil(H/2)] uint8 (int4 packed)
    scale_ptr,               # [E, ceil(F/B), H] hidden dtype
    zero_ptr,                # [E, ceil(F/B), ceil(H/2)] uint8 (HAS_ZERO), else any pointer
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
    BITS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    QBLOCK: tl.constexpr,
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
    hb = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)                 # [BN/2] bytes (int4)
    row_b = (H + 1) // 2                                                      # bytes per row (int4)
    row_q = H if BITS == 8 else row_b
    nblocks = (F + QBLOCK - 1) // QBLOCK
    ks = tl.arange(0, BLOCK_K)
    dt = inter_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < F
        a = tl.load(inter_ptr + pairs[:, None] * F + kk[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        q_rows = q_ptr + expert * F * row_q + kk.to(tl.int64)[:, None] * row_q
        if BITS == 8:
            q = tl.load(q_rows + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0)
            q = q.to(tl.float32)
        else:
            b = tl.load(q_rows + hb[None, :], mask=k_ok[:, None] & (hb < row_b)[None, :], other=0)
            b = b.to(tl.int32)
            lo, hi = b & 15, b >> 4
            if not HAS_ZERO:
                lo, hi = lo - ((lo & 8) << 1), hi - ((hi & 8) << 1)
            q = tl.join(lo, hi).reshape(BLOCK_K, BLOCK_N).to(tl.float32)
        sblock = expert * nblocks + k0 // QBLOCK
        s = tl.load(scale_ptr + sblock * H + cols, mask=col_ok, other=0.0)
        if HAS_ZERO:
            zb = tl.load(zero_ptr + sblock * row_q + hb, mask=hb < row_b, other=0).to(tl.int32)
            q = q - tl.join(zb & 15, zb >> 4).reshape(BLOCK_N).to(tl.float32)[None, :]
        w = (q * s.to(tl.float32)[None, :]).to(dt)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    wt = tl.load(weights_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * wt[:, None]
    out_ptrs = partial_ptr + pairs[:, None] * H + cols[None, :]
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])
