"""The export's weights as the fast graph reads them: arrays by state-dict name, where each one was
cut from, and where model.onnx keeps its bytes (``onnx_locate``), so the fast graph can point at
them instead of holding a second copy.

A fused export stacks the experts (``<experts>.gate_up`` [E, H, 2F], ``.down`` [E, F, H]; quantized:
``<experts>.gate_up_quantized`` / ``_scale`` / ``_zero_point`` with the same leading axes). They are
viewed as the per-expert gate/up/down weights the adapter names ([out, in] floats as a state dict
holds them; quantized ones as ``<name>_quantized`` [in, out], ``<name>_scale``, ``<name>_zero_point``,
the dense weights' layout: blocks run along the input axis, so cutting columns is exact), and each
view remembers its ``Origin``: which stacked tensor, which expert, which columns. Weights that side
by side make up one whole expert slab (gate then up: the slab [H, 2F]; down: [F, H]) are that slab's
bytes in model.onnx: ``slab_of`` says so, and the builder points at them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from mixport import onnx_io, quant
from mixport.runtime import onnx_locate
from mixport.runtime.onnx_locate import Where

QUANTIZED, SCALE, ZERO = "_quantized", "_scale", "_zero_point"  # passes/quantize_weights' suffixes


@dataclass(frozen=True)
class Origin:
    """A weight cut from expert ``index`` of the stacked ``tensor`` ([count, rows, width]): its columns
    ``cols`` of that slab (a quantized weight: the tensor's ``_quantized`` / ``_scale`` / ... alike)."""

    tensor: str
    index: int
    count: int
    cols: tuple[int, int]
    width: int


@dataclass(frozen=True)
class Slab:
    """One expert's whole slab of a stacked tensor."""

    tensor: str
    index: int
    count: int


class Exported(dict):
    """The export's weights by name (name -> array), with ``origins`` (the views of stacked experts)
    and ``where`` (model.onnx initializer name -> its bytes; locations relative to the folder)."""

    def __init__(self, weights: dict[str, np.ndarray], origins: dict[str, Origin] | None = None,
                 where: dict[str, Where] | None = None) -> None:
        super().__init__(weights)
        self.origins = origins or {}
        self.where = where or {}


def slab_of(origins: dict[str, Origin], keys: list[str]) -> Slab | None:
    """The slab that the weights ``keys``, their columns side by side in this order, are exactly."""
    found = [origins.get(k) for k in keys]
    if not found or any(o is None for o in found):
        return None
    first: Origin = found[0]  # type: ignore[assignment]
    col = 0
    for o in found:
        if o.tensor != first.tensor or o.index != first.index or o.cols[0] != col:  # type: ignore[union-attr]
            return None
        col = o.cols[1]  # type: ignore[union-attr]
    return Slab(first.tensor, first.index, first.count) if col == first.width else None


def export_weights(model_path: Path, names: Any) -> Exported:
    """The initializers of an export's model.onnx by state-dict name (external data resolved), the
    stacked experts viewed per expert (module docstring); ``names``: the family's adapter."""
    proto = onnx_locate.skeleton(model_path)  # reads model.onnx's records, none of its external data
    onnx_io.check_external_locations(model_path, proto)  # before anything reads external data
    weights = {t.name: tensor_array(Path(model_path).parent, t) for t in proto.graph.initializer}
    del proto
    origins: dict[str, Origin] = {}
    for i in range(_layer_count(weights)):
        base = names.experts_prefix(i)
        slab: Callable[[int, str], str] = lambda e, role, i=i: names.expert_weight(i, e, role)  # noqa: E731
        if f"{base}.gate_up" in weights:
            _float_slabs(weights, origins, base, slab)
        if f"{base}.gate_up{QUANTIZED}" in weights:
            _quantized_slabs(weights, origins, base, slab)
    return Exported(weights, origins, onnx_locate.locate(model_path))


def tensor_bytes(folder: Path, tensor: onnx.TensorProto) -> np.ndarray:
    """An initializer's raw bytes as stored (int4 / uint4 packed two per byte), memory-mapped when
    they are external data."""
    if not external_data_helper.uses_external_data(tensor):
        return np.frombuffer(tensor.raw_data, np.uint8) if tensor.raw_data else \
            np.ascontiguousarray(numpy_helper.to_array(tensor)).reshape(-1).view(np.uint8)
    info = {e.key: e.value for e in tensor.external_data}
    where = Where(info["location"], int(info.get("offset", 0)), int(info["length"]))
    return np.memmap(folder / where.location, np.uint8, "r", where.offset, (where.length,))


def tensor_array(folder: Path, tensor: onnx.TensorProto) -> np.ndarray:
    """An initializer's value: a read-only memory map of its bytes in the file (read when used, never
    all at once; a transposed view is free), unpacked for int4 / uint4, read for small ones."""
    if not external_data_helper.uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    if "length" not in info:  # a pointer without its length: let onnx read it the usual way
        return numpy_helper.to_array(tensor, base_dir=str(folder))
    where = Where(info["location"], int(info.get("offset", 0)), int(info["length"]))
    mapped = where.array(folder, tensor.data_type, list(tensor.dims))
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return Packed4(mapped, tuple(tensor.dims), tensor.data_type == onnx.TensorProto.INT4)
    return mapped


class Packed4:
    """An int4 / uint4 tensor left packed in its file: its shape and type without reading it, its
    values (``np.asarray``) unpacked only when something computes with them; ``[e]`` and
    ``[e, :, a:b]`` cut one expert (and columns) of a stacked one, unpacking just that expert. The
    fast graph's builder reads QMoE experts' shapes only, so an int4 export is never unpacked whole
    (at 32 layers of Mixtral-8x7B that would be 45 GB of int8 values)."""

    def __init__(self, raw: np.ndarray, shape: tuple[int, ...], signed: bool,
                 cut: tuple[int, slice] | None = None) -> None:
        self.raw, self.signed, self.cut = raw, signed, cut
        self.full = shape
        self.shape = shape if cut is None else (shape[1], len(range(*cut[1].indices(shape[2]))))
        self.dtype = quant.INT4 if signed else quant.UINT4

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: int(np.prod(self.shape, dtype=np.int64)))
    nbytes = size  # as ml_dtypes holds it: a byte per value

    def __getitem__(self, key: Any) -> Packed4:
        index, rows, cols = (key, slice(None), slice(None)) if not isinstance(key, tuple) else \
            (key + (slice(None), slice(None)))[:3]
        if self.cut is not None or len(self.full) != 3 or not isinstance(index, (int, np.integer)) \
                or rows != slice(None):
            raise TypeError(f"Packed4 cuts one expert and its columns, not {key!r}")
        return Packed4(self.raw, self.full, self.signed, (int(index), cols))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if self.cut is None:
            values = quant.unpack_int4(self.raw, self.size, self.signed).reshape(self.full)
        else:
            e, cols = self.cut
            per = self.full[1] * self.full[2]
            if per % 2:  # the expert starts inside a byte: unpack up to its end
                values = quant.unpack_int4(self.raw, (e + 1) * per, self.signed)[e * per:]
            else:
                values = quant.unpack_int4(self.raw[e * per // 2:(e + 1) * per // 2], per, self.signed)
            values = values.reshape(self.full[1:])[:, cols]
        return values if dtype is None else values.astype(dtype)


def _layer_count(weights: dict[str, np.ndarray]) -> int:
    layers = {int(n.split(".")[1]) for n in weights if n.startswith("layers.") and n.split(".")[1].isdigit()}
    return max(layers, default=-1) + 1


def _record(origins: dict[str, Origin], slab: Callable[[int, str], str], base: str, e: int, count: int,
            f: int, h: int) -> None:
    """Where expert e's gate ([0, F) of gate_up), up ([F, 2F)) and down (all H columns) come from."""
    origins[slab(e, "gate")] = Origin(f"{base}.gate_up", e, count, (0, f), 2 * f)
    origins[slab(e, "up")] = Origin(f"{base}.gate_up", e, count, (f, 2 * f), 2 * f)
    origins[slab(e, "down")] = Origin(f"{base}.down", e, count, (0, h), h)


def _float_slabs(weights: dict[str, np.ndarray], origins: dict[str, Origin], base: str,
                 slab: Callable[[int, str], str]) -> None:
    gate_up, down = weights.pop(f"{base}.gate_up"), weights.pop(f"{base}.down")  # [E, H, 2F], [E, F, H]
    count, f = gate_up.shape[0], down.shape[1]
    for e in range(count):
        weights[slab(e, "gate")] = gate_up[e, :, :f].T
        weights[slab(e, "up")] = gate_up[e, :, f:].T
        weights[slab(e, "down")] = down[e].T
        _record(origins, slab, base, e, count, f, down.shape[2])


def _quantized_slabs(weights: dict[str, np.ndarray], origins: dict[str, Origin], base: str,
                     slab: Callable[[int, str], str]) -> None:
    count, f, h = weights[f"{base}.down{QUANTIZED}"].shape
    for suffix in (QUANTIZED, SCALE, ZERO):
        if f"{base}.gate_up{suffix}" not in weights:
            continue
        gate_up, down = weights.pop(f"{base}.gate_up{suffix}"), weights.pop(f"{base}.down{suffix}")
        for e in range(count):  # columns of gate_up: gate [0, F), up [F, 2F)
            weights[slab(e, "gate") + suffix] = gate_up[e, :, :f]
            weights[slab(e, "up") + suffix] = gate_up[e, :, f:]
            weights[slab(e, "down") + suffix] = down[e]
    for e in range(count):
        _record(origins, slab, base, e, count, f, h)
