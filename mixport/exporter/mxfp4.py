"""MXFP4 checkpoint tensors (GPT-OSS hub files), dequantized on read one expert at a time.

A quantized tensor W is stored as two: ``W_blocks`` uint8 [E, R, G, 16] (two FP4 e2m1 codes per
byte, the low nibble first) and ``W_scales`` uint8 [E, R, G] (one power-of-two exponent per block
of 32 values, biased by 127). Value j of block g in row r is FP4[code] * 2 ** (scale - 127); the
row holds the G * 32 values, and transformers then swaps the last two axes
(``integrations/mxfp4.py``, ``convert_moe_packed_tensors``): W is [E, G * 32, R]. A ``Pair``
reads one expert's blocks and scales (never the whole tensor), dequantizes in fp32 (exact: an
FP4 value times a power of two) and returns the slice the adapter asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mixport.errors import CheckpointError

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCKS, SCALES = "_blocks", "_scales"
BLOCK_BYTES = 16  # 32 FP4 values per scale


@dataclass(frozen=True)
class Pair:
    """One MXFP4 tensor: its blocks and scales in the checkpoint, and the tensor they stand for."""

    name: str  # the dequantized tensor's checkpoint name (blocks name without "_blocks")
    blocks: str
    scales: str
    blocks_path: Path
    scales_path: Path
    shape: tuple[int, ...]  # [E, G * 32, R], as transformers dequantizes it

    def read(self, index: tuple) -> torch.Tensor:
        """``W[index]`` in fp32; ``index`` starts with the expert (an int): only it is read."""
        from safetensors import safe_open

        if not index or not isinstance(index[0], int):
            raise CheckpointError("an MXFP4 tensor is read one expert at a time", given=f"{self.name}[{index}]",
                                  expected="an index starting with the expert")
        with safe_open(str(self.blocks_path), framework="pt") as fh:
            blocks = fh.get_slice(self.blocks)[index[0]]  # [R, G, 16]
        with safe_open(str(self.scales_path), framework="pt") as fh:
            scales = fh.get_slice(self.scales)[index[0]]  # [R, G]
        from mixport.models.adapter import take

        return take(dequantize(blocks, scales).T, index[1:]).contiguous()  # [G * 32, R] = [in, out], indexed


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> fp32 [..., G * 32]."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = blocks.to(torch.uint8)
    out = torch.empty(*codes.shape[:-1], 2 * codes.shape[-1], dtype=torch.float32)
    out[..., 0::2] = lut[(codes & 0x0F).long()]
    out[..., 1::2] = lut[(codes >> 4).long()]
    out = torch.ldexp(out, scales.to(torch.int32)[..., None] - 127)
    return out.reshape(*out.shape[:-2], -1)


def pairs(shapes: dict[str, tuple[Path, tuple[int, ...]]]) -> dict[str, Pair]:
    """Every ``X_blocks`` of ``shapes`` (name -> (file, shape)) with its ``X_scales``, by blocks name."""
    found = {}
    for name, (path, shape) in shapes.items():
        if not name.endswith(BLOCKS) or name[:-len(BLOCKS)] + SCALES not in shapes:
            continue
        base = name[:-len(BLOCKS)]
        scales_path, scales_shape = shapes[base + SCALES]
        if len(shape) != 4 or shape[-1] != BLOCK_BYTES or tuple(scales_shape) != tuple(shape[:-1]):
            raise CheckpointError(f"MXFP4 tensor '{base}' has blocks and scales of unexpected shapes",
                                  given=f"blocks {list(shape)}, scales {list(scales_shape)}",
                                  expected="blocks [E, R, G, 16] uint8 and scales [E, R, G] uint8")
        found[name] = Pair(base, name, base + SCALES, path, scales_path, (shape[0], shape[2] * 32, shape[1]))
    return found


def scales_of(found: dict[str, Pair]) -> set[str]:
    return {p.scales for p in found.values()}
