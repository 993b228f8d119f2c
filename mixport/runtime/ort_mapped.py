"""model.onnx for the portable ONNX Runtime session with each expert's weights read in place.

The MoE function bodies (``passes/moe_bodies.py``) take expert e's slab as ``Gather(stack, e)``
(for quantized stacks ``Gather(DequantizeLinear(stack), e)``), constants that ONNX Runtime folds when
the session starts. Folding computes a new copy of every slab while the stack it came from is already
in memory, so the session held both: about twice the weights (4-layer mini-Mixtral fp32: 1004 MB
resident for 479 MB of weights; ``tools/bench_real_size.py`` at Mixtral-8x7B's layer size).

Here the same graph is handed to ONNX Runtime with the functions inlined (``onnx.inliner``, what ONNX
Runtime does itself) and each such Gather replaced by an initializer that points at the slab's bytes
inside model.onnx.data (``onnx_locate.Where.part``): ONNX Runtime memory-maps it and nothing is
folded from a whole stack. A quantized slab becomes a per-expert DequantizeLinear of the expert's
part of the quantized stack, scales and zero points (its axis one lower), folded or fused per expert.
The computation is the same, node for node; only where the slab's bytes come from changes.

Only external data is rewritten: an inline model.onnx (below 2 GB) keeps its raw bytes in the
protobuf, which ONNX Runtime reads rather than maps, so pointing into it saves nothing (measured).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from mixport.runtime import onnx_locate

FOLDER_CONFIG = "session.model_external_initializers_file_folder_path"
_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.INT8: 8, TensorProto.UINT8: 8,
         TensorProto.FLOAT16: 16, TensorProto.BFLOAT16: 16, TensorProto.FLOAT: 32}


@dataclass(frozen=True)
class Mapped:
    """The rewritten graph (no weight bytes in it) and how many slabs now point into the files."""

    proto: onnx.ModelProto
    slabs: int


def mapped(model_path: Path) -> Mapped | None:
    """model.onnx with its expert slabs pointing into its external data, or None when there is
    nothing to map (no external data, or no constant-index Gather of a stacked weight)."""
    model_path = Path(model_path)
    proto = onnx_locate.skeleton(model_path)  # big inline tensors become pointers into model.onnx
    where = onnx_locate.locate(model_path)
    proto = onnx.inliner.inline_local_functions(proto)
    rewrite = _Rewrite(proto, where)
    slabs = rewrite.run()
    return Mapped(proto, slabs) if slabs else None


class _Rewrite:
    def __init__(self, proto: onnx.ModelProto, where: dict[str, onnx_locate.Where]) -> None:
        self.proto, self.where = proto, where
        self.inits = {t.name: t for t in proto.graph.initializer}
        self.consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node
                       if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"}
        self.producer = {o: n for n in proto.graph.node for o in n.output}
        self.added: list[TensorProto] = []
        self.dequantized: dict[tuple[str, int], list[str]] = {}

    def run(self) -> int:
        nodes, slabs = [], 0
        for node in self.proto.graph.node:
            made = self._slab(node) if node.op_type == "Gather" else None
            if made is None:
                nodes.append(node)
                continue
            nodes.extend(made)
            slabs += 1
        if not slabs:
            return 0
        nodes = _live(nodes, {o.name for o in self.proto.graph.output})
        used = {i for n in nodes for i in n.input}
        kept = [t for t in self.proto.graph.initializer if t.name in used] + self.added
        del self.proto.graph.node[:], self.proto.graph.initializer[:]
        self.proto.graph.node.extend(nodes)
        self.proto.graph.initializer.extend(kept)  # the stacks themselves are no longer read
        return slabs

    def _index(self, node: onnx.NodeProto) -> int | None:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        value = self.consts.get(node.input[1])
        if value is None and node.input[1] in self.inits and not external_data_helper.uses_external_data(
                self.inits[node.input[1]]):
            value = numpy_helper.to_array(self.inits[node.input[1]])
        if axis != 0 or value is None or value.ndim != 0 or not np.issubdtype(value.dtype, np.integer):
            return None
        return int(value)

    def _slab(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        """The nodes (none: an initializer) that replace ``node`` = Gather(stack, e), or None."""
        e = self._index(node)
        if e is None:
            return None
        source = node.input[0]
        if source in self.inits:
            part = self._part(source, e, node.output[0])
            if part is None:
                return None
            self.added.append(part)
            return []
        dq = self.producer.get(source)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        return self._dequantized_part(dq, e, node.output[0])

    def _part(self, name: str, e: int, out: str) -> TensorProto | None:
        """Initializer ``out`` = ``name``[e] as a pointer into its file, when its bytes are whole."""
        tensor, where = self.inits.get(name), self.where.get(name)
        if tensor is None or where is None or len(tensor.dims) < 1 or not 0 <= e < tensor.dims[0]:
            return None
        bits = _BITS.get(tensor.data_type)
        per = int(np.prod(tensor.dims[1:], dtype=np.int64)) * (bits or 0)
        if not bits or per % 8 or where.length != per // 8 * tensor.dims[0]:
            return None  # e.g. int4 experts of odd size: a part would start inside a byte
        return where.part(e, tensor.dims[0]).pointer(out, tensor.data_type, list(tensor.dims[1:]))

    def _dequantized_part(self, dq: onnx.NodeProto, e: int, out: str) -> list[onnx.NodeProto] | None:
        """DequantizeLinear(q[e], scale[e][, zero[e]]) for Gather(DequantizeLinear(q, scale[, zero]), e)."""
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if axis < 1:
            return None
        parts = [self._part(name, e, f"{out}.{role}") for name, role in
                 zip(dq.input, ("quantized", "scale", "zero_point"), strict=False) if name]
        if any(p is None for p in parts):
            return None
        self.added.extend(parts)  # type: ignore[arg-type]
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute if a.name != "axis"}
        return [helper.make_node("DequantizeLinear", [p.name for p in parts], [out],  # type: ignore[union-attr]
                                 name=f"{out}.dequantize", axis=axis - 1, **attrs)]


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without those whose outputs nothing uses (the whole-stack DequantizeLinears)."""
    while True:
        used = outputs | {i for n in nodes for i in n.input}
        kept = [n for n in nodes if any(o in used for o in n.output)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept
