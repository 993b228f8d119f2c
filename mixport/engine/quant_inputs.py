"""Quantized MoE nodes (plugin_version "2") for the TensorRT parser: INT4 / UINT4 expert weights
and zero points re-typed as INT8 bytes in the kernels' layout.

# E experts, K input rows, N output columns

TensorRT has INT4 only as the weights of a dequantize layer (weight-only quantization), and
plugin tensors cannot be UINT8 (``PluginTensorDesc``: "kBOOL and kUINT8 are not supported"),
so the MoE plugin takes packed int4 as INT8 bytes, [E, K, packed_row_bytes(N)]
(``plugins.kernels.qlayout``). When the segments of N are even (2F and H of every real model),
those are the file's own bytes: only the initializer's data type and dims change, and weights in
external data stay in their file at their offset. Odd segments are repacked in memory (a
protobuf holds at most 2 GB: fine for the odd sizes tests use). int8 weights pass unchanged.
Done on the in-memory copy the parser reads; the file is never written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mixport.errors import BuildError
from mixport.ops import DOMAIN, MOE, QUANT_PLUGIN_VERSION
from mixport.plugins.kernels.qlayout import SEGMENTS, from_onnx_int4, is_onnx_identical, packed_row_bytes

PACKED_INPUTS = {3: "gate_up", 4: "down", 7: "gate_up", 8: "down"}  # input position -> weight it packs like


def _int4_types() -> tuple[int, int]:
    from onnx import TensorProto

    return TensorProto.INT4, TensorProto.UINT4


def _raw_bytes(tensor: Any, base_dir: Path) -> np.ndarray:
    """The ONNX-packed bytes of an INT4/UINT4 initializer, loaded into ``tensor`` if external."""
    from onnx import TensorProto, numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor

    from mixport.quant import pack_int4

    if tensor.data_location == TensorProto.EXTERNAL:
        load_external_data_for_tensor(tensor, str(base_dir))
        tensor.data_location = TensorProto.DEFAULT
        del tensor.external_data[:]
    if tensor.HasField("raw_data"):
        return np.frombuffer(tensor.raw_data, np.uint8)
    return pack_int4(numpy_helper.to_array(tensor))


def retype_int4(tensor: Any, segments: int, base_dir: Path) -> None:
    """An INT4/UINT4 initializer [.., N] -> INT8 [.., packed_row_bytes(N, segments)], kernel layout."""
    from onnx import TensorProto

    shape = tuple(int(d) for d in tensor.dims)
    packed_shape = (*shape[:-1], packed_row_bytes(shape[-1], segments))
    external = tensor.data_location == TensorProto.EXTERNAL
    if not (external and is_onnx_identical(shape[-1], segments)):
        raw = from_onnx_int4(_raw_bytes(tensor, base_dir), shape, segments)
        tensor.ClearField("int32_data")
        tensor.raw_data = raw.tobytes()
    tensor.data_type = TensorProto.INT8
    del tensor.dims[:]
    tensor.dims.extend(packed_shape)


def _quant_moe_nodes(model: Any) -> list[Any]:
    from mixport.engine.network import plugin_version_of

    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == MOE
            and plugin_version_of(n) == QUANT_PLUGIN_VERSION]


def retype_quant_inputs(model: Any, base_dir: Path) -> int:
    """Re-type the INT4/UINT4 weight and zero-point initializers of quantized MoE nodes in
    ``model`` (a ModelProto, weights possibly external beside ``base_dir``); returns how many."""
    initializers = {t.name: t for t in model.graph.initializer}
    done: set[str] = set()
    for node in _quant_moe_nodes(model):
        for pos, weight in PACKED_INPUTS.items():
            if pos >= len(node.input) or node.input[pos] in done:
                continue
            name = node.input[pos]
            tensor = initializers.get(name)
            if tensor is None:
                raise BuildError(f"mixport::MoE node '{node.name}': quantized input {pos} is not an initializer",
                                 given=name, expected="an INT8, INT4 or UINT4 initializer",
                                 hint="export with mixport export --quantize")
            if tensor.data_type in _int4_types():
                retype_int4(tensor, SEGMENTS[weight], base_dir)
                done.add(name)
    _drop_stale_types(model, done)
    return len(done)


def _drop_stale_types(model: Any, names: set[str]) -> None:
    """value_info / graph inputs that still declare a re-typed initializer's INT4 type."""
    for field in (model.graph.value_info, model.graph.input):
        for info in [v for v in field if v.name in names]:
            field.remove(info)


def _attr_int(node: Any, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def zero_points_to_int8(model: Any, base_dir: Path) -> int:
    """Every DequantizeLinear of UINT4 weights with UINT4 zero points -> INT8 weights (q - zero),
    no zero point: the same numbers, ((q - z) - 0) * scale, in a form TensorRT imports (it has no
    UINT4 and no zero points in dequantize layers; q - z lies in [-15, 15]). Those layers take one
    byte per weight in the engine instead of half. The weights are loaded into memory (a protobuf
    holds at most 2 GB). Returns how many nodes were rewritten."""
    from onnx import TensorProto, numpy_helper

    from mixport.quant import dequantize

    initializers = {t.name: t for t in model.graph.initializer}
    uint4 = TensorProto.UINT4
    rewritten, replaced = 0, set()
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        q, zero = initializers.get(node.input[0]), initializers.get(node.input[2])
        if q is None or zero is None or q.data_type != uint4 or zero.data_type != uint4:
            continue
        for tensor in (q, zero):
            if tensor.data_location == TensorProto.EXTERNAL:
                _raw_bytes(tensor, base_dir)  # loads it in place
        values = numpy_helper.to_array(q).astype(np.float32)
        zeros = numpy_helper.to_array(zero)
        axis, block = _attr_int(node, "axis", 1), _attr_int(node, "block_size", 0)
        ones = np.ones(zeros.shape, np.float32)  # dequantize with scale 1: exactly q - z
        shifted = dequantize(values, ones, zeros, axis, block) if block else values - zeros.astype(np.float32)
        name = f"{node.input[0]}_minus_zero_int8"
        model.graph.initializer.append(numpy_helper.from_array(shifted.astype(np.int8), name))
        replaced |= {node.input[0], node.input[2]}
        node.input[0] = name
        del node.input[2]
        rewritten += 1
    _drop_unused(model, replaced)
    return rewritten


def _drop_unused(model: Any, names: set[str]) -> None:
    """Initializers in ``names`` that no node reads any more (TensorRT imports every initializer)."""
    used = {i for n in model.graph.node for i in n.input}
    for tensor in [t for t in model.graph.initializer if t.name in names and t.name not in used]:
        model.graph.initializer.remove(tensor)
    _drop_stale_types(model, names - used)


def inline_quantized_bodies(model: Any) -> Any:
    """``model`` with its local functions inlined when a body dequantizes (quantized MoE): the
    TensorRT parser names a dequantize layer after its output, and a body inlined by the parser at
    two call sites gives two layers one name ("node_of_dequantizelinear_1 ... already in use");
    onnx's inliner makes every call site's names unique."""
    if not any(n.op_type == "DequantizeLinear" for f in model.functions for n in f.node):
        return model
    from onnx import inliner

    return inliner.inline_local_functions(model)
