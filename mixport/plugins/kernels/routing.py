"""Top-k routing kernel: the TopKRouting contract (``ops.py``), fp32, one program per BLOCK_T tokens.

# T tokens, E experts, k active experts per token, G expert groups

Scores (``SCORING``): 0 softmax over the E logits (or, ``TOPK_FIRST``, order "topk_softmax": the logits
themselves, then a softmax over the k picked), 1 sigmoid, 2 sparsemixer (PhiMoE's two rounds). The
choice = scores (+ the selection bias, ``HAS_BIAS``); with ``N_GROUP`` > 1 only the experts of the
``TOPK_GROUP`` best groups (a group's score: its best choice, or ``GROUP_TOP2`` its two best summed)
stay candidates. Top-k is k rounds of arg-max over the choices; an arg-max picks the LOWEST expert
index among equal maxima (ONNX TopK's rule and the numpy reference's stable sort), then takes that
expert out of the candidates; padding columns are never candidates. The weight of a pick is its
UNBIASED score; then renormalize (sigmoid: by sum + 1e-20) and x ``SCALE``.

One program handles BLOCK_T tokens x BLOCK_E (E rounded up to a power of two) experts.
"""

from __future__ import annotations

import triton.language as tl

from mixport.plugins.kernels._runtime import kernel


@kernel
def topk_routing_kernel(
    logits_ptr,            # [T, E] fp32/fp16/bf16, row-major
    weights_ptr,           # [T, k] out, logits dtype
    ids_ptr,               # [T, k] out, int64
    bias_ptr,              # [E] the selection-only bias (read when HAS_BIAS)
    T,                     # tokens
    E,                     # experts
    SCALE,                 # routed_scaling_factor (fp32)
    TWO_EPS,               # sparsemixer: 2 * eps, rounded to fp32 (its threshold)
    K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    TOPK_FIRST: tl.constexpr,  # order "topk_softmax": softmax over the k picked logits
    SCORING: tl.constexpr,     # 0 softmax, 1 sigmoid, 2 sparsemixer
    HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_TOP2: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)   # [BLOCK_T]
    cols = tl.arange(0, BLOCK_E)                                  # [BLOCK_E]
    slots = tl.arange(0, BLOCK_K)                                 # [BLOCK_K]
    row_ok = rows < T
    valid = row_ok[:, None] & (cols[None, :] < E)                 # [BLOCK_T, BLOCK_E]
    offs = rows.to(tl.int64)[:, None] * E + cols[None, :]
    x = tl.load(logits_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    x = tl.where(row_ok[:, None], x, 0.0)                         # keep dead rows finite
    live = tl.broadcast_to(cols[None, :] < E, [BLOCK_T, BLOCK_E])  # candidates left (dead rows: finite 0s)
    top_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)
    slot_ok = slots[None, :] < K                                  # [1, BLOCK_K]
    if SCORING == 2:  # sparsemixer (PhiMoE, k = 2): two rounds, see ops.py
        gates = tl.where(live, x, float("-inf"))
        for j in tl.static_range(2):
            top = tl.max(gates, axis=1)                                   # [BLOCK_T]
            idx = tl.min(tl.where(live & (gates == top[:, None]), cols[None, :], BLOCK_E), axis=1)
            far = (top[:, None] - x) / tl.maximum(tl.abs(x), top[:, None]) > TWO_EPS
            masked = tl.where(far | (gates == float("-inf")), float("-inf"), gates)
            p = tl.exp(masked - top[:, None])
            weight = tl.sum(tl.where(cols[None, :] == idx[:, None], p, 0.0), axis=1) / tl.sum(p, axis=1)
            top_w = tl.where(slots[None, :] == j, weight[:, None], top_w)
            top_i = tl.where(slots[None, :] == j, idx.to(tl.int64)[:, None], top_i)
            gates = tl.where(cols[None, :] == idx[:, None], float("-inf"), gates)
            live = live & (cols[None, :] != idx[:, None])
    else:
        if SCORING == 1:
            p = 1.0 / (1.0 + tl.exp(-x))
        elif TOPK_FIRST:
            p = x                                                 # rank the logits themselves
        else:
            p = tl.exp(x - tl.max(x, axis=1)[:, None])
            p = p / tl.sum(p, axis=1)[:, None]
        choice = p
        if HAS_BIAS:
            choice = p + tl.load(bias_ptr + cols, mask=cols < E, other=0.0).to(tl.float32)[None, :]
        if N_GROUP > 1:  # keep the experts of the TOPK_GROUP best groups
            gid = cols // GROUP_SIZE                                      # [BLOCK_E]
            gcols = tl.arange(0, BLOCK_G)                                 # [BLOCK_G]
            gscore = tl.zeros([BLOCK_T, BLOCK_G], dtype=tl.float32)
            for g in tl.static_range(N_GROUP):
                in_g = live & (gid[None, :] == g)
                m1 = tl.max(tl.where(in_g, choice, float("-inf")), axis=1)   # [BLOCK_T]
                score = m1
                if GROUP_TOP2:
                    i1 = tl.min(tl.where(in_g & (choice == m1[:, None]), cols[None, :], BLOCK_E), axis=1)
                    score = m1 + tl.max(tl.where(in_g & (cols[None, :] != i1[:, None]), choice, float("-inf")),
                                        axis=1)
                gscore = tl.where(gcols[None, :] == g, score[:, None], gscore)
            glive = tl.broadcast_to(gcols[None, :] < N_GROUP, [BLOCK_T, BLOCK_G])
            keep = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
            for _r in tl.static_range(TOPK_GROUP):
                gbest = tl.max(tl.where(glive, gscore, float("-inf")), axis=1)
                gi = tl.min(tl.where(glive & (gscore == gbest[:, None]), gcols[None, :], BLOCK_G), axis=1)
                keep = tl.where(gid[None, :] == gi[:, None], 1, keep)
                glive = glive & (gcols[None, :] != gi[:, None])
            live = live & (keep > 0)
        for j in tl.static_range(K):
            best = tl.max(tl.where(live, choice, float("-inf")), axis=1)   # [BLOCK_T]
            idx = tl.min(tl.where(live & (choice == best[:, None]), cols[None, :], BLOCK_E), axis=1)
            weight = tl.sum(tl.where(cols[None, :] == idx[:, None], p, 0.0), axis=1)  # its unbiased score
            top_w = tl.where(slots[None, :] == j, weight[:, None], top_w)
            top_i = tl.where(slots[None, :] == j, idx.to(tl.int64)[:, None], top_i)
            live = live & (cols[None, :] != idx[:, None])
        if TOPK_FIRST:
            top_w = tl.where(slot_ok, top_w, float("-inf"))      # slot 0 holds the row's max
            top_w = tl.exp(top_w - tl.max(top_w, axis=1)[:, None])
            top_w = top_w / tl.sum(top_w, axis=1)[:, None]
        if RENORMALIZE:
            top_w = tl.where(slot_ok, top_w, 0.0)
            total = tl.sum(top_w, axis=1)[:, None]
            if SCORING == 1:
                total = total + 1e-20
            top_w = top_w / total
    top_w = top_w * SCALE
    out_ok = row_ok[:, None] & slot_ok
    out_offs = rows.to(tl.int64)[:, None] * K + slots[None, :]
    tl.store(weights_ptr + out_offs, top_w.to(weights_ptr.dtype.element_ty), mask=out_ok)
    tl.store(ids_ptr + out_offs, top_i, mask=out_ok)


def routing_meta(num_experts: int, k: int, n_group: int = 1) -> dict[str, int]:
    """Block sizes for ``topk_routing_kernel``; grid = (cdiv(T, BLOCK_T),)."""
    from mixport.plugins.kernels._runtime import next_pow2

    block_e = next_pow2(num_experts)
    return {"BLOCK_T": max(1, min(64, 4096 // block_e)), "BLOCK_E": block_e,
            "BLOCK_K": next_pow2(k), "BLOCK_G": next_pow2(n_group)}
