"""The scratch memory of ``fused_moe``, as slices of one byte buffer (the TensorRT workspace).

# T tokens, E experts, H hidden, F intermediate, k active, P = T*k pairs, BM = block_m

``fused_moe`` needs, besides its output (all offsets 256-byte aligned)::

    sorted_ids   int32 [P + E*(BM-1)]        moe_align_block_size
    expert_ids   int32 [cdiv(P + E*(BM-1), BM)]
    num_post     int32 [1]
    inter        dtype [P, F]                gate/up + SwiGLU, in the hidden dtype
    partial      fp32  [P, H]                down * routing weight, before the k-way sum

The plugin asks TensorRT for ``moe_workspace_bytes`` (the most any token count
up to the profile's maximum needs) and hands the buffer TensorRT passes to
``enqueue`` to ``fused_moe(workspace=...)``; called without one, ``fused_moe``
allocates one buffer of ``scratch_bytes`` through torch and carves it the same way.
Pure Python: torch is imported only by :func:`carve`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mixport.plugins.kernels.configs import block_m_ranges, choose_block_m

if TYPE_CHECKING:
    from torch import Tensor

ALIGN = 256
ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4}


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to the 256-byte alignment of every slice."""
    return -(-nbytes // ALIGN) * ALIGN


@dataclass(frozen=True)
class Slice:
    """One scratch tensor: ``shape`` elements of ``dtype`` at byte ``offset`` of the buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        n = ITEM_BYTES[self.dtype]
        for dim in self.shape:
            n *= dim
        return n


def scratch_layout(pairs: int, hidden: int, ffn: int, experts: int, dtype: str,
                   block_m: int) -> list[Slice]:
    """The slices for ``pairs`` (token, expert) pairs with block size ``block_m``."""
    padded = pairs + experts * (block_m - 1)
    wanted = [("sorted_ids", "int32", (padded,)), ("expert_ids", "int32", (-(-padded // block_m),)),
              ("num_post", "int32", (1,)), ("inter", dtype, (pairs, ffn)), ("partial", "float32", (pairs, hidden))]
    slices, offset = [], 0
    for name, kind, shape in wanted:
        piece = Slice(name, kind, shape, offset)
        slices.append(piece)
        offset += aligned(piece.nbytes)
    return slices


def scratch_bytes(layout: list[Slice]) -> int:
    """Bytes a buffer needs to hold ``layout``."""
    return layout[-1].offset + aligned(layout[-1].nbytes) if layout else 0


def moe_scratch_bytes(tokens: int, hidden: int, ffn: int, experts: int, k: int, dtype: str,
                      block_m: int | None = None) -> int:
    """Scratch bytes of one ``fused_moe`` call (``block_m``: as chosen by the call, by default)."""
    pairs = tokens * k
    bm = block_m or choose_block_m(pairs, experts)
    return scratch_bytes(scratch_layout(pairs, hidden, ffn, experts, dtype, bm))


def moe_workspace_bytes(max_tokens: int, hidden: int, ffn: int, experts: int, k: int, dtype: str) -> int:
    """The workspace a MoE plugin requests: enough for every token count from 1 to ``max_tokens``.

    The size grows with the pair count for a fixed BLOCK_M, and BLOCK_M steps
    with it, so the largest pair count of each BLOCK_M's range needs the most.
    """
    return max((scratch_bytes(scratch_layout(pairs, hidden, ffn, experts, dtype, bm))
                for bm, pairs in block_m_ranges(max_tokens * k, experts).items()), default=0)


def carve(buffer: Tensor, layout: list[Slice]) -> dict[str, Any]:
    """Tensor views of ``buffer`` (1-D uint8) for each slice of ``layout`` (no copy)."""
    import torch

    return {s.name: buffer[s.offset: s.offset + s.nbytes].view(getattr(torch, s.dtype)).view(s.shape)
            for s in layout}
