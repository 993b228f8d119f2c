"""Top-k routing kernel: softmax (fp32) over E router logits -> top-k -> normalize,
or (``TOPK_FIRST``, order "topk_softmax") top-k of the logits -> softmax over the k -> normalize.

# T tokens, E experts, k active experts per token

One program handles BLOCK_T tokens x BLOCK_E (E rounded up to a power of two)
experts. Top-k is k rounds of arg-max over the scores (probabilities, or the fp32
logits when TOPK_FIRST); an arg-max picks the LOWEST expert index among equal
maxima (the same order ``torch.topk`` gives on CPU in practice and a stable
descending sort gives in the numpy reference), then takes that expert out of the
candidates, so it never wins again; padding columns are never candidates.
"""

from __future__ import annotations

import triton.language as tl

from mixport.plugins.kernels._runtime import kernel


@kernel
def topk_routing_kernel(
    logits_ptr,            # [T, E] fp32/fp16/bf16, row-major
    weights_ptr,           # [T, k] out, logits dtype
    ids_ptr,               # [T, k] out, int64
    T,                     # tokens
    E,                     # experts
    K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    TOPK_FIRST: tl.constexpr,  # order "topk_softmax": softmax over the k picked logits
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)   # [BLOCK_T]
    cols = tl.arange(0, BLOCK_E)                                  # [BLOCK_E]
    slots = tl.arange(0, BLOCK_K)                                 # [BLOCK_K]
    row_ok = rows < T
    valid = row_ok[:, None] & (cols[None, :] < E)                 # [BLOCK_T, BLOCK_E]
    offs = rows.to(tl.int64)[:, None] * E + cols[None, :]
    x = tl.load(logits_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    x = tl.where(row_ok[:, None], x, 0.0)                         # keep dead rows finite
    if TOPK_FIRST:
        p = x                                                     # rank the logits themselves
    else:
        x = x - tl.max(x, axis=1)[:, None]
        p = tl.exp(x)
        p = p / tl.sum(p, axis=1)[:, None]
    live = tl.broadcast_to(cols[None, :] < E, [BLOCK_T, BLOCK_E])  # candidates left (dead rows: finite 0s)
    top_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)
    for j in tl.static_range(K):
        best = tl.max(tl.where(live, p, float("-inf")), axis=1)   # [BLOCK_T]
        idx = tl.min(tl.where(live & (p == best[:, None]), cols[None, :], BLOCK_E), axis=1)
        top_w = tl.where(slots[None, :] == j, best[:, None], top_w)
        top_i = tl.where(slots[None, :] == j, idx.to(tl.int64)[:, None], top_i)
        live = live & (cols[None, :] != idx[:, None])
    slot_ok = slots[None, :] < K                                  # [1, BLOCK_K]
    if TOPK_FIRST:
        top_w = tl.where(slot_ok, top_w, float("-inf"))          # slot 0 holds the row's max
        top_w = tl.exp(top_w - tl.max(top_w, axis=1)[:, None])
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]
    if RENORMALIZE:
        top_w = tl.where(slot_ok, top_w, 0.0)
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]
    out_ok = row_ok[:, None] & slot_ok
    out_offs = rows.to(tl.int64)[:, None] * K + slots[None, :]
    tl.store(weights_ptr + out_offs, top_w.to(weights_ptr.dtype.element_ty), mask=out_ok)
    tl.store(ids_ptr + out_offs, top_i, mask=out_ok)


def routing_meta(num_experts: int, k: int) -> dict[str, int]:
    """Block sizes for ``topk_routing_kernel``; grid = (cdiv(T, BLOCK_T),)."""
    from mixport.plugins.kernels._runtime import next_pow2

    block_e = next_pow2(num_experts)
    return {"BLOCK_T": max(1, min(64, 4096 // block_e)), "BLOCK_E": block_e,
            "BLOCK_K": next_pow2(k)}
