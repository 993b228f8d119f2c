"""Quantized expert weights as the grouped GEMM kernels read them (pure NumPy).

# E experts, K input rows (H for gate_up, F for down), N output columns (2F, H), S segments

int8 weights: the contract's tensors as they are, int8 [E, K, N].

int4 / uint4 weights and uint4 zero points: **segment-packed bytes**, uint8
[E, K, S * ceil(N/S/2)]. Each row's N columns are cut into S equal segments
(gate_up: S = 2, gate | up; down: S = 1); each segment is packed two values per
byte starting on a byte boundary, the lower column in the low nibble, an odd
segment padded with a 0 high nibble. When N/S is even (every real model: 2F and
H are even), this is byte for byte ONNX's INT4/UINT4 raw data (flat order, lower
index in the low nibble) viewed as [E, K, N/2]: nothing is copied, and an
engine builder re-types the initializer in place, external data included (the
weights of an 8x7B stay where they are on disk). Only odd segments are repacked.

Why packed along N (ONNX's order) and not along K (GPTQ's): a kernel tile is
[BLOCK_K, BLOCK_N/2] contiguous bytes of one row block (vectorized loads, like
the float kernels' [BLOCK_K, BLOCK_N]), split into low / high nibbles and
interleaved back into column order with ``tl.join`` + reshape (a register
shuffle); the segment boundary keeps the up half of gate_up byte-aligned even
when F is odd. Scales stay [E, ceil(K/B), N] in the float type (unpacked).

``from_onnx_int4`` is the one conversion from the ONNX layout.
"""

from __future__ import annotations

import math

import numpy as np

SEGMENTS = {"gate_up": 2, "down": 1}  # output segments per weight (and its zero points)


def packed_row_bytes(n: int, segments: int = 1) -> int:
    """Bytes per row of an N-column int4 tensor in the kernel layout."""
    if n % segments:
        raise ValueError(f"{n} columns do not split into {segments} equal segments")
    return segments * -(-(n // segments) // 2)


def is_onnx_identical(n: int, segments: int = 1) -> bool:
    """Whether the kernel layout of N columns is ONNX's raw INT4 bytes, reshaped (no copy)."""
    return n % segments == 0 and (n // segments) % 2 == 0


def from_onnx_int4(packed: np.ndarray, shape: tuple[int, ...], segments: int = 1) -> np.ndarray:
    """ONNX INT4/UINT4 raw bytes (flat order, low nibble first) of a tensor of ``shape`` (last axis
    N) -> the kernel layout, uint8 [..., packed_row_bytes(N, segments)]; a view when N/S is even."""
    *lead, n = shape
    row = packed_row_bytes(n, segments)
    count = math.prod(shape)
    flat = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if flat.size != -(-count // 2):
        raise ValueError(f"{flat.size} bytes do not hold {count} int4 values of shape {tuple(shape)}")
    if is_onnx_identical(n, segments):
        return flat.reshape(*lead, row)
    nibbles = np.empty(flat.size * 2, np.uint8)
    nibbles[0::2], nibbles[1::2] = flat & 0x0F, flat >> 4
    seg = n // segments
    nibbles = nibbles[:count].reshape(*lead, segments, seg)
    nibbles = np.concatenate([nibbles, np.zeros((*lead, segments, 1), np.uint8)], axis=-1)  # seg is odd
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).reshape(*lead, row)
