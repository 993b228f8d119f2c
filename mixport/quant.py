"""Weight-only block quantization: the numbers every stage shares (export, passes, kernels, runtime).

A weight W is stored row-major [in, out] (what ONNX MatMul takes; stacked experts [E, in, out]).
It is cut into blocks of ``block_size`` consecutive rows along the *input* axis (the last block
may be shorter: ``in`` need not be a multiple of the block), each column of each block with its
own scale (and zero point): scale [ceil(in/B), out] ([E, ceil(in/B), out] for stacked experts:
never shared across experts). That is exactly ONNX's blocked ``DequantizeLinear`` (opset 21,
``axis`` = the input axis, ``block_size`` = B)::

    W[i, n] ~= (q[i, n] - zero[i // B, n]) * scale[i // B, n]

Schemes (``Scheme``):

* int8, symmetric: q in [-127, 127], scale = absmax / 127, no zero point (int8 storage).
* int4, symmetric: q in [-8, 7], scale = -m / 8 where m is the block's value of largest
  magnitude (sign kept), so that value lands on -8 exactly and every other on [-8, 8] (8 is
  clipped to 7): all 16 levels used, as llama.cpp's q4_0 does. Stored as ONNX INT4.
* int4, asymmetric: q in [0, 15], scale = (max - min) / 15, zero = round(-min / scale) in
  [0, 15] (UINT4 storage, UINT4 zero points; min/max taken with 0 included, so 0 is exact).

In memory, quantized values are numpy arrays of ml_dtypes' ``int4`` / ``uint4`` / numpy ``int8``
(one value per byte); files hold int4 packed two per byte, the element with the lower index in
the low nibble (ONNX's order: ``pack_int4``, checked against ``onnx.reference`` in the tests).
Quantizing reads one expert slab at a time: memory stays near one expert's weights; the export
quantizes a few blocks of rows at a time (``quantize_rows``) and writes each part as it comes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from mixport.errors import ConfigError

BITS = (8, 4)
BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK_SIZE = 32
CHUNK_VALUES = 1 << 22  # values quantized at once by quantize_rows (16 MB in fp32, a few such temporaries)
PRECISIONS = ("int8", "int4")
INT4 = np.dtype(ml_dtypes.int4)
UINT4 = np.dtype(ml_dtypes.uint4)


@dataclass(frozen=True)
class Scheme:
    """How weights are quantized: bit width, block size along the input axis, zero points or not."""

    bits: int
    block_size: int = DEFAULT_BLOCK_SIZE
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ConfigError("unsupported quantization bit width", given=str(self.bits),
                              expected=" | ".join(map(str, BITS)))
        if self.block_size < 2 or self.block_size & (self.block_size - 1):
            raise ConfigError("unsupported quantization block size", given=str(self.block_size),
                              expected="a power of two >= 2 (" + " | ".join(map(str, BLOCK_SIZES)) + ")")
        if self.bits == 8 and not self.symmetric:
            raise ConfigError("int8 is quantized symmetrically only", given="int8 with zero points",
                              expected="int8 (symmetric), or int4 with zero points")

    @property
    def name(self) -> str:
        """``int8``, ``int4`` or ``int4-zp`` (what manifests and reports say)."""
        return f"int{self.bits}" + ("" if self.symmetric else "-zp")

    @property
    def qdtype(self) -> np.dtype:
        """The stored element type of the quantized values."""
        if self.bits == 8:
            return np.dtype(np.int8)
        return INT4 if self.symmetric else UINT4

    @property
    def qrange(self) -> tuple[int, int]:
        return {8: (-127, 127), 4: (-8, 7) if self.symmetric else (0, 15)}[self.bits]

    @classmethod
    def parse(cls, precision: str, block_size: int = DEFAULT_BLOCK_SIZE, zero_points: bool = False) -> Scheme:
        """From the CLI's words: ``int8`` | ``int4`` (+ zero points for int4)."""
        if precision not in PRECISIONS:
            raise ConfigError("unknown quantization precision", given=precision, expected=" | ".join(PRECISIONS))
        return cls(int(precision[3:]), block_size, symmetric=not zero_points)


@dataclass(frozen=True)
class QuantOptions:
    scheme: Scheme
    lm_head: bool = False  # quantize the lm_head too (--quantize-lm-head)

    def record(self) -> dict[str, object]:
        """The manifest's ``quantization`` section."""
        s = self.scheme
        return dict(bits=s.bits, block_size=s.block_size, symmetric=s.symmetric, lm_head=self.lm_head,
                    scheme=s.name)


@dataclass
class Quantized:
    """q (scheme.qdtype, W's shape), scale (W's float dtype, blocked shape), zero (UINT4 or None)."""

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None
    axis: int
    block_size: int


def blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def _block_view(w: np.ndarray, axis: int, block_size: int) -> tuple[np.ndarray, int]:
    """W (fp32) padded with zeros along ``axis`` to whole blocks, viewed [..., nb, B, ...]; pad."""
    n = w.shape[axis]
    nb = blocks(n, block_size)
    pad = nb * block_size - n
    if pad:
        widths = [(0, 0)] * w.ndim
        widths[axis] = (0, pad)
        w = np.pad(w, widths)
    shape = w.shape[:axis] + (nb, block_size) + w.shape[axis + 1:]
    return w.reshape(shape), pad


def _quantize_f32(w: np.ndarray, axis: int, scheme: Scheme) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """fp32 W -> (integer q as int32, fp32 scale, int32 zero or None), blocks along ``axis``."""
    view, pad = _block_view(w, axis, scheme.block_size)
    b = axis + 1  # the within-block axis of the view
    lo, hi = scheme.qrange
    if not scheme.symmetric:
        wmin = np.minimum(view.min(axis=b, keepdims=True), 0.0)
        wmax = np.maximum(view.max(axis=b, keepdims=True), 0.0)
        scale = (wmax - wmin) / float(hi - lo)
        safe = np.where(scale == 0, 1.0, scale)
        zero = np.clip(np.rint(-wmin / safe), lo, hi)
        q = np.clip(np.rint(view / safe) + zero, lo, hi)
    else:
        if scheme.bits == 4:  # the signed value of largest magnitude lands on -8 (q4_0's rule)
            idx = np.expand_dims(np.abs(view).argmax(axis=b), b)
            scale = np.take_along_axis(view, idx, axis=b) / float(lo)
        else:
            scale = np.abs(view).max(axis=b, keepdims=True) / float(hi)
        safe = np.where(scale == 0, 1.0, scale)
        q = np.clip(np.rint(view / safe), lo, hi)
        zero = None
    q = q.reshape(view.shape[:axis] + (-1,) + view.shape[b + 1:])
    if pad:
        q = np.take(q, np.arange(w.shape[axis]), axis=axis)
    scale = np.squeeze(scale, b)
    return q.astype(np.int32), scale.astype(np.float32), None if zero is None else np.squeeze(zero, b).astype(np.int32)


def quantize(w: np.ndarray, scheme: Scheme, axis: int = -2) -> Quantized:
    """Quantize W along ``axis`` (default: the input axis of [in, out] / [E, in, out]) by ``scheme``.
    Scales keep W's float dtype (fp32/fp16/bf16), computed in fp32; stacked W is done a slab at a time."""
    w = np.asarray(w)
    axis = axis % w.ndim
    if w.ndim == 3 and axis > 0:  # one expert at a time: memory ~ one slab in fp32
        parts = [quantize(w[e], scheme, axis - 1) for e in range(w.shape[0])]
        zero = None if scheme.symmetric else np.stack([p.zero for p in parts])  # type: ignore[misc]
        return Quantized(np.stack([p.q for p in parts]), np.stack([p.scale for p in parts]), zero, axis,
                         scheme.block_size)
    q, scale, zero = _quantize_f32(np.asarray(w, dtype=np.float32), axis, scheme)
    return Quantized(q.astype(scheme.qdtype), scale.astype(w.dtype),
                     None if zero is None else zero.astype(UINT4), axis, scheme.block_size)


def quantize_rows(w: np.ndarray, scheme: Scheme, chunk_values: int | None = None) -> Iterator[Quantized]:
    """``quantize(w, scheme, axis=0)`` of a 2-D [in, out] W, a few whole blocks of rows at a time
    (about ``chunk_values`` values, default CHUNK_VALUES): blocks are quantized independently, so
    each part's q, scale and zero are exactly the next rows of quantize's (the next elements in C
    order), and memory holds one part's temporaries, not W's in fp32."""
    n, out = w.shape
    chunk_values = CHUNK_VALUES if chunk_values is None else chunk_values
    rows = max(1, chunk_values // max(1, scheme.block_size * out)) * scheme.block_size
    for start in range(0, n, rows):
        yield quantize(w[start:start + rows], scheme, axis=0)


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int, block_size: int
               ) -> np.ndarray:
    """ONNX blocked DequantizeLinear in numpy: (q - zero) * scale, each scale repeated over its block
    along ``axis`` (the last block cut to fit); the result has the scale's dtype (fp32 arithmetic)."""
    axis = axis % q.ndim
    n = q.shape[axis]
    rep = lambda a: np.repeat(np.asarray(a, dtype=np.float32), block_size, axis=axis).take(  # noqa: E731
        np.arange(n), axis=axis)
    x = q.astype(np.float32)
    if zero is not None:
        x = x - rep(zero.astype(np.float32))
    return (x * rep(scale)).astype(scale.dtype)


def dequantized(qz: Quantized) -> np.ndarray:
    return dequantize(qz.q, qz.scale, qz.zero, qz.axis, qz.block_size)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int4/uint4 values (any shape) -> uint8 bytes, two per byte, flat order, lower index in the
    low nibble; an odd count pads the last high nibble with 0 (ONNX's INT4/UINT4 raw_data layout)."""
    flat = np.asarray(q).reshape(-1).astype(np.int8).view(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, count: int, signed: bool = True) -> np.ndarray:
    """The inverse of ``pack_int4``: ``count`` values as ml_dtypes int4 (or uint4)."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    nibbles = np.empty(packed.size * 2, np.uint8)
    nibbles[0::2], nibbles[1::2] = packed & 0x0F, packed >> 4
    # ml_dtypes keeps a 4-bit value in the low nibble of its byte (-1 is 0x0F): the nibbles are the
    # values as they are, no arithmetic or wider copy (a 940M-value expert stack: 1.9 GB, not 5.6)
    return nibbles[:count].view(INT4 if signed else UINT4)
