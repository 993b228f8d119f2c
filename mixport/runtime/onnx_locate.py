"""Where each initializer's bytes lie in a saved ONNX file, so that another graph can point at them.

A second graph over the same weights (the fast ONNX Runtime graph beside model.onnx) need not copy
them: an initializer stored as external data with ``location`` = the first file, ``offset`` and
``length`` = where its raw bytes sit there, reads the very same bytes. For a tensor that is external
data already (model.onnx.data past 2 GB) that is its own pointer; for one stored inline, the offset
of its ``raw_data`` inside the protobuf file, found by walking the wire format (ModelProto field 7
``graph`` -> GraphProto field 5 ``initializer`` -> TensorProto field 8 ``name``, field 9 ``raw_data``;
repeated ``graph`` records merge, which is how ``onnx_io`` writes big inline files). Only the
records' headers are read (a memory map); payloads are skipped by their lengths.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper

from mixport.folder_check import _varint
from mixport.folder_check import wire_fields as _fields

_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_NAME, _TENSOR_RAW = 7, 5, 8, 9  # onnx.proto's field numbers
INLINE_BELOW = 4096  # skeleton(): raw_data shorter than this stays in the graph


@dataclass(frozen=True)
class Where:
    """An initializer's bytes: ``length`` bytes at ``offset`` in ``location`` (relative to the folder)."""

    location: str
    offset: int
    length: int

    def part(self, index: int, count: int) -> Where:
        """The ``index``-th of ``count`` equal consecutive parts (one expert of a stacked tensor; a
        caller checks the part's length against what it expects: int4 parts of odd size do not
        start on bytes)."""
        size = self.length // count
        return Where(self.location, self.offset + index * size, size)

    def array(self, folder: Path, data_type: int, dims: list[int]) -> np.ndarray:
        """These bytes as a read-only array mapped from the file (nothing read until used; int4 /
        uint4 as packed uint8 bytes, the caller unpacks)."""
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
        if dtype.itemsize == 1 and data_type in (TensorProto.INT4, TensorProto.UINT4):
            return np.memmap(Path(folder) / self.location, np.uint8, "r", self.offset, (self.length,))
        return np.memmap(Path(folder) / self.location, dtype, "r", self.offset, tuple(dims))

    def pointer(self, name: str, data_type: int, dims: list[int]) -> TensorProto:
        """An initializer ``name`` that reads these bytes as external data."""
        tensor = TensorProto(name=name, data_type=data_type, dims=dims, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", self.offset), ("length", self.length)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        return tensor


def _inline(path: Path) -> dict[str, tuple[int, int]]:
    """{initializer name: (offset, length) of its raw_data} for the initializers stored inline."""
    found: dict[str, tuple[int, int]] = {}
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        graphs = [(g0, g1) for field, g0, g1 in _fields(buf, 0, len(buf)) if field == _MODEL_GRAPH]
        tensors = [(t0, t1) for g0, g1 in graphs for field, t0, t1 in _fields(buf, g0, g1)
                   if field == _GRAPH_INITIALIZER]
        for t0, t1 in tensors:
            parts = {field: (v0, v1) for field, v0, v1 in _fields(buf, t0, t1)}
            if _TENSOR_NAME in parts and _TENSOR_RAW in parts:
                (n0, n1), (r0, r1) = parts[_TENSOR_NAME], parts[_TENSOR_RAW]
                found[buf[n0:n1].decode()] = (r0, r1 - r0)
    return found


def locate(model_path: Path) -> dict[str, Where]:
    """{initializer name: Where} for every initializer of ``model_path`` whose bytes are raw data
    (inline ``raw_data`` or external data); locations are relative to the model's folder."""
    model_path = Path(model_path)
    proto = skeleton(model_path)
    where: dict[str, Where] = {}
    for tensor in proto.graph.initializer:
        if external_data_helper.uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            if "length" in info:
                where[tensor.name] = Where(info["location"], int(info.get("offset", 0)), int(info["length"]))
    for name, (offset, length) in _inline(model_path).items():
        where.setdefault(name, Where(model_path.name, offset, length))
    return where


def skeleton(model_path: Path) -> onnx.ModelProto:
    """``model_path``'s model without its weight bytes: each initializer stored inline (raw_data of
    ``INLINE_BELOW`` bytes or more) becomes an external-data pointer to where its bytes lie in the file,
    so a 2 GB inline model.onnx is read as a few MB of graph (``onnx.load`` would read all of it);
    initializers that are external data already stay as they are."""
    model_path = Path(model_path)
    model = onnx.ModelProto()
    with model_path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for field, t0, p0, p1 in _records(buf, 0, len(buf)):
            if field != _MODEL_GRAPH:
                model.MergeFromString(buf[t0:p1])
                continue
            graph = onnx.GraphProto()
            for gfield, g0, q0, q1 in _records(buf, p0, p1):
                if gfield == _GRAPH_INITIALIZER:
                    graph.initializer.append(_pointer_tensor(buf, q0, q1, model_path.name))
                else:
                    graph.MergeFromString(buf[g0:q1])
            model.graph.MergeFrom(graph)
    return model


def check_locations(model_path: Path) -> None:
    """``onnx_io.check_external_locations`` of ``model_path``'s skeleton: a 2 GB inline model.onnx is
    not read whole (``onnx.load`` without its external data still reads every inline byte: a 1-layer
    Mixtral-8x7B int4 model.onnx of 1.9 GB peaked at 3.7 GB); a file that is not a model is left to the
    loader that follows, which says so its way."""
    from mixport import onnx_io

    try:
        proto = skeleton(model_path)
    except (ValueError, OSError):
        return
    onnx_io.check_external_locations(model_path, proto)


def _pointer_tensor(buf: mmap.mmap, start: int, end: int, location: str) -> TensorProto:
    tensor, raw = TensorProto(), None
    for field, t0, r0, r1 in _records(buf, start, end):
        if field == _TENSOR_RAW and r1 - r0 >= INLINE_BELOW:
            raw = (r0, r1)
        else:
            tensor.MergeFromString(buf[t0:r1])
    if raw is None:
        return tensor
    return Where(location, raw[0], raw[1] - raw[0]).pointer(tensor.name, tensor.data_type, list(tensor.dims))


def _records(buf: mmap.mmap, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, record start, payload start, record end) of each field of buf[pos:end] (any wire
    type; for a length-delimited field the payload is [payload start, record end))."""
    while pos < end:
        start = pos
        key, pos = _varint(buf, pos, end)
        kind = key & 7
        if kind == 0:
            body, pos = pos, _varint(buf, pos, end)[1]
        elif kind in (1, 5):
            body, pos = pos, pos + (8 if kind == 1 else 4)
        elif kind == 2:
            size, body = _varint(buf, pos, end)
            pos = body + size
        else:
            raise ValueError(f"wire type {kind} at byte {pos}")
        if pos > end:
            raise ValueError(f"field {key >> 3} runs {pos - end} bytes past its message")
        yield key >> 3, start, body, pos
