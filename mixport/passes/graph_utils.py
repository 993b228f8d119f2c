"""Small onnx-graphsurgeon helpers shared by the passes: look-ups by structure, constants.

Constants whose data lives in a file (external data) are imported as ``FileValues``: they
export as the same external-data TensorProto and read as a memory map of the file, through
the ``onnx_io.WeightFiles`` the graph was imported with (``import_graph``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper, numpy_helper

from mixport import ops
from mixport.onnx_io import SMALL, WeightFiles


class FileValues(gs.ir.tensor.LazyValues):
    """Values of a constant kept in a file: onnx-graphsurgeon exports ``tensor`` (the
    external-data TensorProto) unchanged; ``load`` is a read-only memory map of the data."""

    def __init__(self, tensor: onnx.TensorProto, files: WeightFiles) -> None:
        super().__init__(tensor)
        self.files = files

    def load(self) -> np.ndarray:
        return self.files.read(self.tensor)


def import_graph(proto: onnx.ModelProto, files: WeightFiles | None) -> gs.Graph:
    """``gs.import_onnx``, with every external-data constant backed by ``files``."""
    graph = gs.import_onnx(proto)
    if files is None:
        return graph
    for tensor in graph.tensors().values():
        lazy = getattr(tensor, "_values", None)
        if type(lazy) is gs.ir.tensor.LazyValues and external_data_helper.uses_external_data(lazy.tensor):
            tensor.values = FileValues(lazy.tensor, files)
    return graph


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that writes ``tensor`` (None for constants and graph inputs)."""
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def producer_op(tensor: gs.Tensor, *ops: str) -> gs.Node | None:
    node = producer(tensor)
    return node if node is not None and node.op in ops and (node.domain or "") in ("", "ai.onnx") else None


def mixport_nodes(graph: gs.Graph, op: str) -> list[gs.Node]:
    """The graph's ``mixport::op`` nodes (TopKRouting, MoE)."""
    return [n for n in graph.nodes if n.domain == ops.DOMAIN and n.op == op]


def const_array(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant node output), exact dtype (bf16 too)."""
    if isinstance(tensor, gs.Constant):
        lazy = getattr(tensor, "_values", None)
        if isinstance(lazy, FileValues):
            return lazy.load()
        if isinstance(lazy, gs.ir.tensor.LazyValues):
            if external_data_helper.uses_external_data(lazy.tensor):
                raise ValueError(f"constant {tensor.name} is external data, and no weight folder is set")
            return numpy_helper.to_array(lazy.tensor)
        return np.asarray(tensor.values)
    node = producer(tensor)
    if node is not None and node.op == "Constant" and not node.inputs:
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant):
            return const_array(value)
    return None


def slabs(tensor: gs.Tensor) -> Iterator[np.ndarray]:
    """The [in, out] slabs of a constant [E, in, out] tensor (stacked experts), one at a time. File
    backed: each a memory map of its own bytes, unmapped when dropped, so the pages read never
    add up to the whole stack in the process (``WeightFiles.slabs``)."""
    lazy = getattr(tensor, "_values", None)
    if isinstance(lazy, FileValues):
        yield from lazy.files.slabs(lazy.tensor)
        return
    yield from const_array(tensor)  # type: ignore[misc]


def const_int(tensor: gs.Tensor) -> int | None:
    """A scalar (or one-element) integer constant, else None."""
    arr = const_array(tensor)
    if arr is None or arr.size != 1 or not np.issubdtype(arr.dtype, np.integer):
        return None
    return int(arr.reshape(-1)[0])


def is_zero(tensor: gs.Tensor) -> bool:
    """True when ``tensor`` is provably all zeros: a zero constant, or Expand/CastLike/Cast of one."""
    arr = const_array(tensor)
    if arr is not None:
        return bool(arr.size and not np.any(arr.astype(np.float32)))
    node = producer(tensor)
    if node is None or (node.domain or "") not in ("", "ai.onnx"):
        return False
    if node.op in ("Expand", "CastLike", "Cast", "Identity"):
        return is_zero(node.inputs[0])
    if node.op == "ConstantOfShape":
        value = node.attrs.get("value")
        return value is None or not np.any(const_array(value).astype(np.float32))
    return False


def make_constant(name: str, array: np.ndarray, files: WeightFiles | None = None) -> gs.Constant:
    """A gs.Constant that exports bit-exact, bf16 included (through a TensorProto, not a numpy cast);
    with ``files``, one of SMALL bytes or more is appended to their work file at once, not kept."""
    if files is not None and array.nbytes >= SMALL:
        return gs.Constant(name, values=FileValues(files.add(name, array), files))
    proto = numpy_helper.from_array(np.ascontiguousarray(array), name)
    return gs.Constant(name, values=gs.ir.tensor.LazyValues(proto))


def stacked_constant(name: str, parts: Iterable[np.ndarray], count: int, files: WeightFiles | None = None
                     ) -> gs.Constant:
    """``make_constant(name, np.stack(parts), files)`` with ``count`` parts of one shape and dtype,
    the stack never in memory when it goes to the work file: each part is written as the iterable
    yields it (``WeightFiles.add_stacked``)."""
    it = iter(parts)
    first = np.asarray(next(it))
    if files is None or count * first.nbytes < SMALL:
        return make_constant(name, np.stack([first, *it]), files)
    parts = _prepend(first, it)
    del first  # the generator holds it until it is written, then drops it
    return gs.Constant(name, values=FileValues(files.add_stacked(name, parts, count), files))


def _prepend(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    del first
    yield from rest


class ConstantWriter:
    """A constant of known ``dtype`` and ``shape`` made a part at a time: ``write(part)`` gives the
    next ``part.size`` elements in C order; ``close()`` returns what ``make_constant`` of the whole
    would. With ``files`` and SMALL bytes or more, each part goes to the work file at once (a
    reserved region, ``WeightFiles.reserve``); else the parts are joined in memory at the end."""

    def __init__(self, name: str, dtype: np.dtype, shape: tuple[int, ...], files: WeightFiles | None) -> None:
        self.name, self.dtype, self.shape, self.files = name, np.dtype(dtype), shape, files
        big = files is not None and math.prod(shape) * self.dtype.itemsize >= SMALL  # make_constant's rule
        self.slot = files.reserve(name, self.dtype, shape) if big else None  # type: ignore[union-attr]
        self.parts: list[np.ndarray] = []

    def write(self, part: np.ndarray) -> None:
        if self.slot is not None:
            self.slot.write(part)
        else:
            self.parts.append(np.asarray(part, dtype=self.dtype).reshape(-1))

    def close(self) -> gs.Constant:
        if self.slot is not None:
            return gs.Constant(self.name, values=FileValues(self.slot.close(), self.files))  # type: ignore[arg-type]
        whole = np.concatenate(self.parts) if self.parts else np.zeros(0, self.dtype)
        return make_constant(self.name, whole.reshape(self.shape), self.files)


def set_opset(model: onnx.ModelProto, version: int) -> None:
    """Import the standard opset ``version`` in the model and in each of its functions (the ops
    mixport writes mean the same from opset 18 on; 21 adds blocked DequantizeLinear and int4)."""
    for imports in [model.opset_import, *(f.opset_import for f in model.functions)]:
        for opset in imports:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, version)


def unique_name(graph: gs.Graph, base: str) -> str:
    taken = graph.tensors()
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def node_count(graph: gs.Graph) -> int:
    return len(graph.nodes)


def initializer_count(graph: gs.Graph) -> int:
    return sum(isinstance(t, gs.Constant) for t in graph.tensors().values())


_LIST_ATTRS = {"value_ints": (onnx.TensorProto.INT64, True), "value_int": (onnx.TensorProto.INT64, False),
               "value_floats": (onnx.TensorProto.FLOAT, True), "value_float": (onnx.TensorProto.FLOAT, False)}


def tensorize_constants(model: onnx.ModelProto) -> int:
    """Constant nodes given as value_int(s)/value_float(s) -> one ``value`` tensor (same meaning).

    onnx-graphsurgeon reads an EMPTY value_ints as a float64 array; a typed tensor keeps int64.
    """
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
            continue
        attr = node.attribute[0]
        if attr.name not in _LIST_ATTRS:
            continue
        dtype, is_list = _LIST_ATTRS[attr.name]
        values = list(onnx.helper.get_attribute_value(attr)) if is_list else [onnx.helper.get_attribute_value(attr)]
        tensor = onnx.helper.make_tensor(node.output[0], dtype, [len(values)] if is_list else [], values)
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("value", tensor))
        changed += 1
    return changed
