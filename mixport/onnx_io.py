"""Weights kept in files while the graph is worked on: the export's memory stays near one copy.

The traced graph's weights are streamed to a data file as soon as the exporter has them;
the graph (small) is loaded without them. Passes read a weight through a memory map of
that file (``read_array``) and write the big tensors they make (stacked experts) to a
second file (``Sink``). ``write_model`` finally copies every weight the graph still uses
into the output: inline in ``model.onnx`` under 2 GB, else ``model.onnx.data``, a tensor
at a time. Locations in the TensorProtos are relative to one folder (``base_dir``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper

ALIGN = 64  # byte alignment of tensors in the files written here (memory maps, SIMD loads)
SMALL = 1024  # in-memory tensors under this many bytes stay in the graph itself
CHUNK = 64 << 20


def _info(tensor: TensorProto) -> tuple[str, int, int | None]:
    fields = {e.key: e.value for e in tensor.external_data}
    length = fields.get("length")
    return fields["location"], int(fields.get("offset", 0)), None if length is None else int(length)


def _point(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` external data at ``location`` (relative to the model's folder)."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    tensor.data_location = TensorProto.EXTERNAL


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


def read_array(tensor: TensorProto, base_dir: Path) -> np.ndarray:
    """A read-only memory map of an external tensor (exact dtype, bf16 included)."""
    location, offset, _ = _info(tensor)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    shape = tuple(int(d) for d in tensor.dims)
    if not int(np.prod(shape)):
        return np.zeros(shape, dtype)
    return np.memmap(Path(base_dir) / location, dtype=dtype, mode="r", offset=offset, shape=shape)


def read_bytes(tensor: TensorProto, base_dir: Path) -> bytes:
    location, offset, length = _info(tensor)
    with (Path(base_dir) / location).open("rb") as fh:
        fh.seek(offset)
        return fh.read(nbytes(tensor) if length is None else length)


class Sink:
    """Appends arrays to a file; each append returns a TensorProto pointing there."""

    def __init__(self, base_dir: Path, name: str, folder: Path | None = None) -> None:
        """The file is ``folder/name`` (default ``base_dir/name``); TensorProtos locate it
        relative to ``base_dir``, the folder every location of the graph is resolved from."""
        self.base_dir = Path(base_dir)
        self.path = Path(folder or base_dir) / name
        self.name = os.path.relpath(self.path, self.base_dir)
        self.path.write_bytes(b"")

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        with self.path.open("r+b") as fh:
            fh.seek(0, 2)
            offset = -(-fh.tell() // ALIGN) * ALIGN
            fh.seek(offset)
            fh.write(array.reshape(-1).view(np.uint8))
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                             dims=list(array.shape))
        _point(tensor, self.name, offset, array.nbytes)
        return tensor


def write_model(proto: onnx.ModelProto, path: Path, base_dir: Path | None, two_gb: int,
                on_tensor: Callable[[int, int], None] | None = None) -> list[str]:
    """Write PATH with every weight it uses: inline when the file stays under ``two_gb``, else
    PATH.data (a tensor at a time; in-memory tensors of SMALL bytes+ move there too). ``base_dir``
    resolves the initializers that point to files; ``on_tensor(done, total)`` after each big
    tensor. Returns the file names written."""
    report = on_tensor or (lambda _done, _total: None)
    path = Path(path)
    data_name = f"{path.name}.data"
    external = [t for t in proto.graph.initializer if external_data_helper.uses_external_data(t)]
    if external and base_dir is None:
        raise ValueError(f"{len(external)} initializers are external data, and no folder resolves them")
    if proto.ByteSize() + sum(nbytes(t) for t in external) < two_gb:  # ByteSize holds in-memory data
        _write_inline(proto, path, base_dir, report)
        return [path.name]
    moving = [t for t in proto.graph.initializer if stored_apart(t)]
    with (path.parent / data_name).open("wb") as out:
        for done, tensor in enumerate(moving, 1):
            uses_file = external_data_helper.uses_external_data(tensor)
            offset = -(-out.tell() // ALIGN) * ALIGN
            out.seek(offset)
            if uses_file:
                location, start, _ = _info(tensor)
                length = nbytes(tensor)
                with (Path(base_dir) / location).open("rb") as src:
                    src.seek(start)
                    _copy(src, out, length)
            else:
                length = len(tensor.raw_data)
                out.write(tensor.raw_data)
            _point(tensor, data_name, offset, length)
            report(done, len(moving))
    onnx.save_model(proto, str(path))
    return [path.name, data_name]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


_GRAPH_FIELD = b"\x3a"  # ModelProto.graph: field 7, length-delimited


def _write_inline(proto: onnx.ModelProto, path: Path, base_dir: Path | None,
                  report: Callable[[int, int], None]) -> None:
    """One self-contained file, written a weight at a time: the model without its big
    initializers, then each as its own ``graph { initializer { ... } }`` record. Protobuf
    parsers merge repeated occurrences of a message field, so readers see one graph holding
    every initializer (as if serialized at once), without the whole file ever in memory."""
    big = [t for t in proto.graph.initializer if stored_apart(t)]
    head = onnx.ModelProto()
    head.CopyFrom(proto)  # external tensors are small here; in-memory ones cost what serializing did
    kept = [t for t in head.graph.initializer if not stored_apart(t)]
    del head.graph.initializer[:]
    head.graph.initializer.extend(kept)
    with path.open("wb") as out:
        out.write(head.SerializeToString())
        for done, tensor in enumerate(big, 1):
            record = TensorProto()
            record.CopyFrom(tensor)  # one tensor at a time
            if external_data_helper.uses_external_data(tensor):
                del record.external_data[:]
                record.data_location = TensorProto.DEFAULT
                record.raw_data = read_bytes(tensor, base_dir)
            graph = onnx.GraphProto()
            graph.initializer.append(record)
            body = graph.SerializeToString()
            out.write(_GRAPH_FIELD + _varint(len(body)) + body)
            report(done, len(big))


def _copy(src, dst, length: int) -> None:  # noqa: ANN001 - binary file objects
    left = length
    while left:
        chunk = src.read(min(CHUNK, left))
        if not chunk:
            raise OSError(f"external data ended {left} bytes early")
        dst.write(chunk)
        left -= len(chunk)
