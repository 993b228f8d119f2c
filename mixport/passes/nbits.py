"""ONNX Runtime's layouts of block-quantized weights (``com.microsoft.MatMulNBits``, ``com.microsoft.QMoE``)
made from mixport's (``mixport/quant.py``: q [K, N] blocked along K, scale [ceil(K/B), N], uint4 zero).

MatMulNBits (contrib op schema of ONNX Runtime 1.32) computes ``A [.., K] @ W [K, N]`` with W given as

* B uint8 [N, n_blocks, blob]: column n's K values, block by block, as *unsigned* codes packed along K,
  lowest index in the low bits (4 bits: two per byte, blob = B/2; 8 bits: one per byte, blob = B);
  the last block is padded to whole blocks (padding codes = the zero point: they dequantize to 0);
* scales [N, n_blocks] (A's float type);
* zero_points (optional) uint8 [N, ceil(n_blocks * bits / 8)], packed like B; absent: 2^(bits-1).

So a symmetric int8 q is stored as q + 128 and a symmetric int4 q as q + 8 with the default zero
point (exact: the same (code - zero) * scale); int4 with zero points (uint4) is stored as is, with
its zero points packed two per byte along the blocks. QMoE takes the same rows per expert, flattened
to [E, N, n_blocks * blob] (its "column major order per expert"), scales [E, N, n_blocks] and zero
points [E, N, ceil(n_blocks * bits / 8)]. tests/passes/test_nbits.py checks both against
``quant.dequantize`` through ONNX Runtime.
Legend: K input features, N output features, B block size, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mixport import quant

MIN_BLOCK, MAX_BLOCK = 16, 1024  # MatMulNBits: a power of two >= 16
# MatMulNBits' / QMoE's accuracy_level for quantized weights wherever mixport runs them on ONNX
# Runtime's CPU provider (the fast graph's and model.onnx's sessions, the ``ort`` target's QMoE):
# 4 = activations quantized to int8 per block inside the kernel. Measured: runtime/ort_graph.py.
ACCURACY_LEVEL = 4


def block_size_of(rows: int, blocks: int) -> int | None:
    """The block size B of a weight with ``rows`` input rows cut into ``blocks`` blocks: the one power
    of two with ceil(rows / B) == blocks when blocks > 1 (doubling B lowers the count), else the
    least power of two >= rows (one block: every such B means the same). None: none fits."""
    fits = [b for b in (1 << p for p in range(4, 11)) if quant.blocks(rows, b) == blocks]
    return fits[0] if fits else None


@dataclass(frozen=True)
class NBits:
    """One weight in MatMulNBits' layout; ``k``, ``n``, ``bits``, ``block_size`` are its attributes."""

    b: np.ndarray  # uint8 [N, n_blocks, blob]
    scales: np.ndarray  # [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(n_blocks * bits / 8)], or None: 2^(bits-1)
    k: int
    n: int
    bits: int
    block_size: int

    def attrs(self) -> dict[str, int]:
        return dict(K=self.k, N=self.n, bits=self.bits, block_size=self.block_size)


def bits_of(q: np.ndarray) -> int:
    """8 for int8 values, 4 for int4 / uint4 (ml_dtypes)."""
    if q.dtype == np.int8:
        return 8
    if q.dtype in (quant.INT4, quant.UINT4):
        return 4
    raise ValueError(f"not a quantized weight type: {q.dtype}")


def _codes(q: np.ndarray) -> tuple[np.ndarray, int]:
    """Unsigned codes (uint8) of q and the zero point they imply when none is stored."""
    bits = bits_of(q)
    offset = 0 if q.dtype == quant.UINT4 else 1 << (bits - 1)
    return (q.astype(np.int16) + offset).astype(np.uint8), (1 << (bits - 1))


def _pack4(codes: np.ndarray) -> np.ndarray:
    """[.., 2m] 4-bit codes -> [.., m] bytes, even index in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def to_nbits(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, block_size: int) -> NBits:
    """q [K, N] (int8 | int4 | uint4), scale [ceil(K/B), N], zero [ceil(K/B), N] uint4 or None -> NBits."""
    k, n = q.shape
    nb = quant.blocks(k, block_size)
    assert scale.shape == (nb, n), (scale.shape, nb, n)
    codes, default_zero = _codes(q)
    pad = nb * block_size - k
    if pad:  # padding codes dequantize to 0: the block's zero point
        fill = np.full((pad, n), default_zero, np.uint8) if zero is None else \
            np.asarray(zero[-1:], dtype=np.uint8).repeat(pad, axis=0)
        codes = np.concatenate([codes, fill], axis=0)
    rows = np.ascontiguousarray(codes.T)  # [N, nb*B]
    bits = bits_of(q)
    if bits == 4:
        rows = _pack4(rows)
    b = rows.reshape(n, nb, block_size * bits // 8)
    zp = None if zero is None else pack_zero_points(zero, bits)
    return NBits(b, np.ascontiguousarray(scale.T), zp, k, n, bits, block_size)


def pack_zero_points(zero: np.ndarray, bits: int = 4) -> np.ndarray:
    """Zero points [n_blocks, N] -> uint8 [N, ceil(n_blocks * bits / 8)], packed like B."""
    z = np.ascontiguousarray(np.asarray(zero, dtype=np.uint8).T)  # [N, nb]
    if bits == 8:
        return z
    if z.shape[1] % 2:
        z = np.concatenate([z, np.zeros((z.shape[0], 1), np.uint8)], axis=1)
    return _pack4(z)


def concat_columns(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(q, scale, zero) weights with the same K and blocks, side by side along N: exact, since
    every block belongs to one column (q|k|v, gate|up)."""
    zeros = [z for _, _, z in parts]
    if any(z is None for z in zeros) and not all(z is None for z in zeros):
        raise ValueError("some of the weights have zero points and some do not")
    zero = None if zeros[0] is None else np.concatenate(zeros, axis=1)
    return (np.concatenate([q for q, _, _ in parts], axis=1), np.concatenate([s for _, s, _ in parts], axis=1),
            zero)


def expert_rows(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, block_size: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Stacked experts q [E, K, N] -> QMoE's weights [E, N, n_blocks * blob], scales [E, N, n_blocks],
    zero points [E, N, ceil(n_blocks * bits / 8)] (or None)."""
    packed = [to_nbits(q[e], scale[e], None if zero is None else zero[e], block_size) for e in range(q.shape[0])]
    weights = np.stack([p.b.reshape(p.n, -1) for p in packed])
    zp = None if zero is None else np.stack([p.zero_points for p in packed])  # type: ignore[misc]
    return weights, np.stack([p.scales for p in packed]), zp
