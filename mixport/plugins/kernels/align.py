"""Block-aligned grouping of (token, slot) pairs by expert (vLLM's moe_align_block_size).

# T tokens, E experts, k active, P = T*k pairs, BM = block_m

Pair ``p = t*k + j`` is routed to expert ``ids.flat[p]``. Experts get
contiguous, BM-aligned segments in expert order; inside a segment pairs keep
ascending ``p`` (stable, so results are deterministic). Unused slots hold the
sentinel ``P``. Outputs (all int32):

* sorted_token_ids  [P + E*(BM-1)]  pair index or sentinel P
* expert_ids        [cdiv(len(sorted_token_ids), BM)]  expert per block, -1 past the end
* num_tokens_post_padded [1]  sum over experts of roundup(count_e, BM)

One program does everything (P is small next to the GEMMs): count, exclusive
prefix sum over padded counts, scatter, then fill sentinels and block experts.
The scatter and the sentinel fill write disjoint slots, so there is no race.
Pairs whose id is outside [0, E) are dropped.
"""

from __future__ import annotations

import triton.language as tl

from mixport.plugins.kernels._runtime import kernel


@kernel
def moe_align_kernel(
    ids_ptr,                 # [P] int64 expert ids
    sorted_ptr,              # [max_padded] int32 out
    expert_ids_ptr,          # [max_blocks] int32 out
    num_post_ptr,            # [1] int32 out
    P,                       # pairs
    E,                       # experts
    max_padded,              # P + E*(BLOCK_M-1)
    max_blocks,              # cdiv(max_padded, BLOCK_M)
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    experts = tl.arange(0, BLOCK_E)
    lanes = tl.arange(0, BLOCK_N)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, P, BLOCK_N):
        offs = start + lanes
        e = tl.load(ids_ptr + offs, mask=offs < P, other=-1)
        counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    tl.store(num_post_ptr, tl.sum(padded, axis=0))
    seen = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, P, BLOCK_N):
        offs = start + lanes
        e = tl.load(ids_ptr + offs, mask=offs < P, other=-1)
        hit = (e[:, None] == experts[None, :]).to(tl.int32)      # [BLOCK_N, BLOCK_E]
        rank = tl.cumsum(hit, axis=0) - hit                       # exclusive, in chunk
        pos = tl.sum(hit * (starts + seen)[None, :] + hit * rank, axis=1)
        tl.store(sorted_ptr + pos, offs, mask=tl.sum(hit, axis=1) > 0)
        seen += tl.sum(hit, axis=0)
    used_end = starts + counts
    for start in range(0, max_padded, BLOCK_N):
        slot = start + lanes
        used = (slot[:, None] >= starts[None, :]) & (slot[:, None] < used_end[None, :])
        is_used = tl.max(used.to(tl.int32), axis=1) > 0
        tl.store(sorted_ptr + slot, tl.zeros_like(slot) + P,
                 mask=(slot < max_padded) & (is_used == 0))
    for start in range(0, max_blocks, BLOCK_N):
        blk = start + lanes
        row = blk * BLOCK_M
        inside = (row[:, None] >= starts[None, :]) & (row[:, None] < ends[None, :])
        eid = tl.sum(tl.where(inside, experts[None, :], 0), axis=1)
        has = tl.max(inside.to(tl.int32), axis=1) > 0
        tl.store(expert_ids_ptr + blk, tl.where(has, eid, -1), mask=blk < max_blocks)


def align_sizes(num_pairs: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """(max_padded, max_blocks): buffer lengths for sorted_token_ids and expert_ids."""
    max_padded = num_pairs + num_experts * (block_m - 1)
    return max_padded, -(-max_padded // block_m)


def align_meta(num_experts: int, block_m: int) -> dict[str, int]:
    """Constexprs for ``moe_align_kernel``; grid = (1,)."""
    from mixport.plugins.kernels._runtime import next_pow2

    return {"BLOCK_M": block_m, "BLOCK_E": next_pow2(num_experts), "BLOCK_N": 256}
