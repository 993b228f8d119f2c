"""Launch configurations (block sizes, warps, stages) for the grouped GEMMs.

# T tokens, E experts, k active, P = T*k pairs

Shapes of the tiles are chosen from the average number of pairs per expert:
decode-sized batches (few pairs per expert) use BLOCK_M = 16, the smallest
``tl.dot`` tile, and long BLOCK_K to stream weights; prefill batches use
BLOCK_M = 64. fp32 halves BLOCK_K to keep shared memory within sm_80 limits.
The CPU interpreter uses one fixed, small configuration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes and launch options shared by ``gate_up_kernel`` and ``down_kernel``."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def constexprs(self) -> dict[str, int]:
        """The BLOCK_* constexpr arguments of the GEMM kernels."""
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k}

    def as_dict(self) -> dict[str, int]:
        """Plain dict, for manifests and logs."""
        return asdict(self)


DECODE_BLOCK_M, PREFILL_BLOCK_M = 16, 64


def choose_block_m(num_pairs: int, num_experts: int) -> int:
    """BLOCK_M from the average pairs per expert: 16 for decode, 64 for prefill."""
    return DECODE_BLOCK_M if num_pairs <= DECODE_BLOCK_M * num_experts else PREFILL_BLOCK_M


def block_m_ranges(max_pairs: int, num_experts: int) -> dict[int, int]:
    """{BLOCK_M: the largest pair count in 1..max_pairs that ``choose_block_m`` gives it}."""
    decode_limit = DECODE_BLOCK_M * num_experts
    ranges = {DECODE_BLOCK_M: min(max_pairs, decode_limit)} if max_pairs >= 1 else {}
    if max_pairs > decode_limit:
        ranges[PREFILL_BLOCK_M] = max_pairs
    return ranges


def gemm_config(block_m: int, dtype: str, *, interpret: bool = False) -> GemmConfig:
    """Config for ``block_m`` and an element type name ("float16", "bfloat16", "float32")."""
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    if interpret:
        return GemmConfig(block_m, 32, 32, num_warps=4, num_stages=1)
    wide = dtype != "float32"
    if block_m <= 16:
        return GemmConfig(block_m, 64, 128 if wide else 64, num_warps=4, num_stages=4)
    return GemmConfig(block_m, 64 if wide else 32, 64 if wide else 32, num_warps=4, num_stages=3)


def quant_gemm_config(block_m: int, dtype: str, block_size: int, *, interpret: bool = False) -> GemmConfig:
    """``gemm_config`` for quantized experts of quantization block ``block_size``: BLOCK_K is cut
    to at most the block (both powers of two), so each K tile needs one row of scales."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    cfg = gemm_config(block_m, dtype, interpret=interpret)
    return replace(cfg, block_k=min(cfg.block_k, block_size))


REDUCE_BLOCK_H = 256
