"""Weights kept in files while the graph is worked on: the export's memory stays near one copy.

The traced graph's weights are streamed to a work file by onnx_ir as soon as the exporter
has them; the graph (small) is loaded without them. ``WeightFiles`` is the explicit state the
passes get: it resolves the graph's external-data TensorProtos to ``onnx_ir.ExternalTensor``
objects (read as memory maps), and appends the big tensors the passes make (stacked experts)
to a second work file. ``write_model`` finally writes every weight the graph still uses into
the output, a tensor at a time: into ``PATH.data`` through onnx_ir (a kernel-side copy from the
work files), or inline in one file under 2 GB. Locations in the TensorProtos are relative to
one folder (``WeightFiles.base_dir``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import Message
from onnx import TensorProto, external_data_helper, helper

from mixport.errors import FileSystemError

SMALL = 1024  # tensors under this many bytes stay in the graph itself
ALIGN = 64  # byte alignment of the tensors appended to a work file (memory maps, SIMD loads)
PAGE_ALIGN = 4096  # model.onnx.data: tensors past PAGE_ALIGN_OVER bytes start on a page (onnx_ir)
PAGE_ALIGN_OVER = 1 << 20
RECORD_OVERHEAD = 16  # inline file: bytes a one-initializer record adds (tags and lengths)


def _info(tensor: TensorProto) -> tuple[str, int, int | None]:
    fields = {e.key: e.value for e in tensor.external_data}
    length = fields.get("length")
    return fields["location"], int(fields.get("offset", 0)), None if length is None else int(length)


def stored_apart(tensor: TensorProto) -> bool:
    """Does the tensor's data live outside the graph (a file, or a separate record) when written?"""
    return external_data_helper.uses_external_data(tensor) or len(tensor.raw_data) >= SMALL


def nbytes(tensor: TensorProto) -> int:
    """Bytes of the tensor's data, wherever it lives."""
    if external_data_helper.uses_external_data(tensor):
        length = _info(tensor)[2]
        if length is not None:
            return length
        return int(np.prod(tensor.dims)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return len(tensor.raw_data) if tensor.HasField("raw_data") else tensor.ByteSize()


def _inside(path: str, folder: Path | str) -> bool:
    root = os.path.normpath(os.path.abspath(folder))
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _tensors(proto: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto of the model that may hold external data: initializers (sparse ones
    too), tensor attributes, in subgraphs and in functions."""
    graphs: list[onnx.GraphProto] = [proto.graph]
    nodes: list[onnx.NodeProto] = [n for f in proto.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            yield from graph.initializer
            for sparse in graph.sparse_initializer:
                yield sparse.values
                yield sparse.indices
            nodes.extend(graph.node)
            continue
        for attr in nodes.pop().attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                graphs.append(attr.g)
            graphs.extend(attr.graphs)


def location_error(location: str, folder: Path) -> str | None:
    """Why an external-data ``location`` is refused (None: a relative path to a regular file
    that resolves inside ``folder``, symlinks included)."""
    parts = location.replace("\\", "/").split("/")
    if not location or "\0" in location:
        return "an empty location"
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        return "an absolute path"
    if ".." in parts:
        return "a path with '..'"
    path = Path(folder) / location
    if not _inside(os.path.realpath(path), os.path.realpath(folder)):
        return "a symlink that resolves outside the folder"
    if not path.is_file():
        return "a file that is missing (or not a regular file)"
    return None


def check_external_locations(model_path: Path, proto: onnx.ModelProto | None = None) -> None:
    """Refuse a model whose external data would be read from outside its folder, before any
    reader (onnx, ONNX Runtime, TensorRT's parser) opens it.

    ``model_path``'s graph is read without its data (or ``proto`` is taken as that graph); every
    tensor's ``location`` must be a relative path without ``..`` to a regular file that resolves
    inside the model's folder (mixport's check), and onnx's own external-data check must accept
    it too (it refuses symlinks as well). FileSystemError names the tensor and the location."""
    model_path = Path(model_path)
    folder = model_path.parent
    if proto is None:
        try:
            proto = onnx.load(str(model_path), load_external_data=False)
        except Exception:  # protobuf's decode errors: the loader that follows says it its way
            return
    seen: set[str] = set()
    for tensor in _tensors(proto):
        if not external_data_helper.uses_external_data(tensor):
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        if location in seen:
            continue
        why = location_error(location, folder)
        if why is None:
            why = _onnx_refuses(folder, location, tensor.name)
        if why is not None:
            raise FileSystemError("an initializer's external data lies outside the model's folder",
                                  given=f"{model_path.name}: tensor {tensor.name!r}, location {location!r} "
                                        f"({why})",
                                  expected=f"a relative file name inside {folder}",
                                  hint="external data is read only from the model's own folder")
        seen.add(location)


def _onnx_refuses(folder: Path, location: str, name: str) -> str | None:
    """onnx's own external-data path check (it opens the file read-only and closes it), where
    this onnx has it; its message, or None."""
    opener = getattr(getattr(external_data_helper, "c_checker", None), "_open_external_data", None)
    if opener is None:
        return None
    try:
        os.close(opener(str(folder), location, name, True))
    except Exception as exc:  # onnx.checker.ValidationError, OSError
        return f"onnx: {str(exc).splitlines()[0][:200]}"
    return None


class WeightFiles:
    """The files holding a graph's external-data weights while it is worked on.

    Locations in the graph are relative to ``base_dir``. New tensors are appended to the work file
    ``work`` (created on first use; ``on_write(name)`` hears of each): whole (``add``), a part at
    a time as an iterable yields them (``add_stacked``: stacked experts, one expert in memory), or
    into a reserved region filled piecewise (``reserve``: quantized values beside their scales,
    a few rows at a time). A location
    is a relative path to a file inside ``base_dir`` (no ``..``, no absolute path, no symlink
    resolving outside: ``location_error``), or exactly the work file.
    """

    def __init__(self, base_dir: Path, work: Path | None = None,
                 on_write: Callable[[str], None] | None = None) -> None:
        self.base_dir = Path(base_dir)
        self.work = None if work is None else Path(work)
        self.on_write = on_write
        self._work_end = 0
        self._started = False  # this run has written the work file

    def source(self, tensor: TensorProto) -> ir.ExternalTensor:
        """``tensor``'s data as an onnx_ir ExternalTensor (a memory map when read)."""
        location, offset, length = _info(tensor)
        path = os.path.normpath(os.path.abspath(self.base_dir / location))
        why = None if self._is_work(path) else location_error(location, self.base_dir)
        if why is not None:
            raise FileSystemError("an initializer's external data lies outside the model's folder",
                                  given=f"{tensor.name}: location {location!r} ({why})",
                                  expected=f"a relative file name inside {self.base_dir}")
        # an absolute path and no base_dir: onnx_ir then reads it as it is (resolved and checked above)
        return ir.ExternalTensor(path, offset, length, ir.DataType(tensor.data_type),
                                 shape=ir.Shape(tensor.dims), name=tensor.name)

    def _is_work(self, path: str) -> bool:
        """Is ``path`` exactly this run's work file (the only place outside ``base_dir`` read)?"""
        return (self.work is not None and path == os.path.normpath(os.path.abspath(self.work))
                and self.work.is_file() and not self.work.is_symlink())

    def read(self, tensor: TensorProto) -> np.ndarray:
        """A read-only memory map of an external tensor (exact dtype, bf16 included); the mapping
        lives as long as the array."""
        return self.source(tensor).numpy()

    def slabs(self, tensor: TensorProto) -> Iterator[np.ndarray]:
        """The sub-tensors ``tensor[i]`` along its first axis (the experts of a stacked weight), one
        at a time, each a read-only memory map of just its bytes: pages read for one are unmapped
        when it is dropped, not kept until the whole tensor is."""
        whole = self.source(tensor)  # the location checked
        count, inner = int(tensor.dims[0]), ir.Shape(tensor.dims[1:])
        if whole.dtype.bitwidth % 8:
            raise ValueError(f"{tensor.name}: {whole.dtype.name} sub-tensors do not start on a byte")
        step = math.prod(tensor.dims[1:]) * whole.dtype.bitwidth // 8
        for i in range(count):
            yield ir.ExternalTensor(whole.path, (whole.offset or 0) + i * step, step, whole.dtype, shape=inner,
                                    name=f"{tensor.name}[{i}]").numpy()

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        """Append ``array`` to the work file; a TensorProto pointing there (relative to base_dir)."""
        array = np.asarray(array)
        slot = self.reserve(name, array.dtype, array.shape)
        slot.write(array)
        return slot.close()

    def add_stacked(self, name: str, parts: Iterable[np.ndarray], count: int) -> TensorProto:
        """Append ``np.stack(parts)`` (``count`` parts of one shape and dtype) to the work file,
        written a part at a time as the iterable yields it (same bytes, same TensorProto): memory
        holds one part, never the stack."""
        slot, shape = None, None
        for part in parts:
            part = np.asarray(part)
            if slot is None:
                shape = part.shape
                slot = self.reserve(name, part.dtype, (count, *shape))
            if part.shape != shape:
                raise ValueError(f"{name}: a part of shape {part.shape} in a stack of {shape}")
            slot.write(part)
            del part  # before the next one is made: one part in memory
        if slot is None:
            raise ValueError(f"{name}: no parts to stack")
        return slot.close()

    def reserve(self, name: str, dtype: np.dtype, shape: Sequence[int]) -> TensorSlot:
        """Reserve the work file's next aligned region for a tensor ``name`` of ``dtype`` and
        ``shape``: a ``TensorSlot`` written in order, a part at a time. Regions of several
        tensors may be filled side by side (quantized values and their scales)."""
        if self.work is None:
            raise ValueError("these weight files have no work file for new tensors")
        slot = TensorSlot(self, name, ir.DataType.from_numpy(np.dtype(dtype)), tuple(int(d) for d in shape),
                          -(-self._work_end // ALIGN) * ALIGN)
        with self.work.open("r+b" if self._started else "wb") as fh:  # a fresh run starts the file anew
            fh.truncate(slot.offset + slot.nbytes)  # a sparse region, filled by the slot's writes
        self._started = True
        self._work_end = slot.offset + slot.nbytes
        return slot

    def _written(self, slot: TensorSlot) -> TensorProto:
        pointer = ir.serde.serialize_tensor(ir.ExternalTensor(
            os.path.relpath(self.work, self.base_dir), slot.offset, slot.nbytes, slot.dtype,  # type: ignore[arg-type]
            shape=ir.Shape(slot.shape), name=slot.name))
        if self.on_write is not None:
            self.on_write(slot.name)
        return pointer


class TensorSlot:
    """One tensor's region of a work file (``WeightFiles.reserve``), filled front to back by
    ``write(part)``: each part is the next ``part.size`` elements of the tensor in C order (an
    expert's slab, a few rows of it), of the tensor's dtype. 4-bit values are packed two per byte
    as ONNX stores them (a part of odd size leaves its last value for the next part's byte).
    ``close()`` checks that every element came and returns the TensorProto pointing there."""

    def __init__(self, files: WeightFiles, name: str, dtype: ir.DataType, shape: tuple[int, ...],
                 offset: int) -> None:
        self.files, self.name, self.dtype, self.shape, self.offset = files, name, dtype, shape, offset
        self.size = math.prod(shape)
        self.nbytes = -(-self.size * dtype.bitwidth // 8)
        self.done = 0  # elements written
        self._carry: np.ndarray | None = None  # a 4-bit value waiting for its byte's high nibble

    def write(self, part: np.ndarray) -> None:
        part = np.asarray(part)
        if ir.DataType.from_numpy(part.dtype) != self.dtype or self.done + part.size > self.size:
            raise ValueError(f"{self.name}: a part of {part.dtype} x {part.size} does not fit "
                             f"({self.dtype.name}, {self.done} of {self.size} elements written)")
        start = self.done
        self.done += part.size
        if self.dtype.bitwidth == 4:
            part, start = self._whole_bytes(part.reshape(-1), start)
        if not part.size:
            return
        data = ir.tensor(np.ascontiguousarray(part))
        with self.files.work.open("r+b") as fh:  # type: ignore[union-attr]
            fh.seek(self.offset + start * self.dtype.bitwidth // 8)
            data.tofile(fh)

    def _whole_bytes(self, flat: np.ndarray, start: int) -> tuple[np.ndarray, int]:
        """The 4-bit values that fill whole bytes now (the carried one first) and the element index
        they start at; an odd one out waits in ``_carry`` (the tensor's very last is padded)."""
        if self._carry is not None:
            flat, start = np.concatenate([self._carry, flat]), start - 1
        keep = flat.size % 2 if self.done < self.size else 0
        self._carry = flat[flat.size - 1:].copy() if keep else None
        return flat[:flat.size - keep], start

    def close(self) -> TensorProto:
        if self.done != self.size or self._carry is not None:
            raise ValueError(f"{self.name}: {self.done} of {self.size} elements written")
        return self.files._written(self)


def write_model(proto: onnx.ModelProto, path: Path, files: WeightFiles | None, two_gb: int,
                on_tensor: Callable[[int, int], None] | None = None) -> list[str]:
    """Write PATH with every weight it uses: inline when the file stays under ``two_gb``, else
    PATH.data (through onnx_ir; in-memory tensors of SMALL bytes+ move there too). ``files``
    resolves the initializers that point to files; ``on_tensor(done, total)`` for each big
    tensor. ``proto``'s initializers are re-pointed at what was written. Returns the file names."""
    report = on_tensor or (lambda _done, _total: None)
    path = Path(path)
    external = [t for t in proto.graph.initializer if external_data_helper.uses_external_data(t)]
    if external and files is None:
        raise ValueError(f"{len(external)} initializers are external data, and no folder resolves them")
    head = _without(proto, "graph", graph=_without(proto.graph, "initializer"))  # no weight copied
    size = head.ByteSize() + sum(RECORD_OVERHEAD + (nbytes(t) if external_data_helper.uses_external_data(t)
                                                    else t.ByteSize()) for t in proto.graph.initializer)
    if size < two_gb:  # (a tensor's ByteSize serializes it: one at a time, never the whole model)
        _write_inline(head, proto, path, files, report)
        return [path.name]
    data_name = f"{path.name}.data"
    moving = [t for t in proto.graph.initializer if stored_apart(t)]
    sources = [files.source(t) if external_data_helper.uses_external_data(t)  # type: ignore[union-attr]
               else ir.serde.deserialize_tensor(t) for t in moving]
    written = ir.external_data.convert_tensors_to_external(
        sources, base_dir=path.parent, relative_path=data_name, alignment=PAGE_ALIGN,
        align_threshold=PAGE_ALIGN_OVER, callback=lambda _t, info: report(info.index + 1, info.total))
    for tensor, done in zip(moving, written, strict=True):
        _point(tensor, done)
    onnx.save_model(proto, str(path))
    return [path.name, data_name]


def _point(tensor: TensorProto, to: ir.ExternalTensor) -> None:
    """Make ``tensor`` external data where ``to`` says (the fields onnx_ir serializes for it)."""
    pointer = ir.serde.serialize_tensor(to)
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.external_data.extend(pointer.external_data)
    tensor.data_location = TensorProto.EXTERNAL


def _write_inline(head: onnx.ModelProto, proto: onnx.ModelProto, path: Path, files: WeightFiles | None,
                  report: Callable[[int, int], None]) -> None:
    """One self-contained file, written a weight at a time.

    onnx_ir (and onnx) can write a file without external data only by serializing the whole
    ModelProto in memory: every weight copied twice at once. Instead ``head`` (the model without
    its initializers) is written, then each initializer of ``proto`` as its own serialized
    ModelProto holding just ``graph.initializer``: protobuf parses concatenated messages as one
    merged message (repeated fields append, in order), so every reader sees one graph with every
    initializer, in the original order, as if serialized at once. Every byte comes from
    protobuf's own serializer; memory holds the graph plus about one tensor."""
    big = sum(stored_apart(t) for t in proto.graph.initializer)
    done = 0
    with path.open("wb") as out:
        out.write(head.SerializeToString())
        for tensor in proto.graph.initializer:
            if external_data_helper.uses_external_data(tensor):
                _write_external_inline(out, tensor, files)  # type: ignore[arg-type]
            else:
                record = onnx.ModelProto()
                record.graph.initializer.add().CopyFrom(tensor)  # in-memory data
                out.write(record.SerializeToString())
                del record
            if stored_apart(tensor):
                done += 1
                report(done, big)


_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW = 7, 5, 9  # onnx.proto's field numbers
STREAM_CHUNK = 64 << 20  # bytes of a weight copied at once into an inline file


def _write_external_inline(out: BinaryIO, tensor: TensorProto, files: WeightFiles) -> None:
    """The record ModelProto{graph{initializer: tensor with its raw_data}} for a tensor whose bytes
    are in a file, written without holding them: the tensor's other fields serialized by protobuf,
    then raw_data (field 9) streamed from a memory map in chunks (a 470 MB expert stack used to be
    three copies in memory: bytes, the message, its serialization). The wire format is protobuf's;
    the bytes equal SerializeToString's when no field numbered above 9 is set (the usual case)."""
    meta = TensorProto()
    meta.CopyFrom(tensor)
    del meta.external_data[:]
    meta.ClearField("data_location")
    head = meta.SerializeToString()
    source = files.source(tensor)
    length = nbytes(tensor)
    data = np.memmap(source.path, np.uint8, "r", source.offset or 0, (length,)) if length else np.zeros(0, np.uint8)
    raw_key = _varint_bytes(_TENSOR_RAW << 3 | 2) + _varint_bytes(length)
    tensor_len = len(head) + len(raw_key) + length
    graph_key = _varint_bytes(_GRAPH_INITIALIZER << 3 | 2) + _varint_bytes(tensor_len)
    model_key = _varint_bytes(_MODEL_GRAPH << 3 | 2) + _varint_bytes(len(graph_key) + tensor_len)
    out.write(model_key + graph_key + head + raw_key)
    for start in range(0, length, STREAM_CHUNK):
        out.write(data[start:start + STREAM_CHUNK].tobytes())
    del data  # unmapped: the pages read are not kept


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _without(message: Message, field: str, **replace: object) -> Message:
    """A copy of ``message`` without ``field`` (never copied), fields in ``replace`` set instead."""
    kept = {f.name: value for f, value in message.ListFields() if f.name != field}
    return type(message)(**kept, **replace)
