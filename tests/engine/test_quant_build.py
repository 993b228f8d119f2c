"""Quantized exports become TensorRT engines (TensorRT-RTX, CPU-only), with and without plugins;
what the engine builder changes in memory to get there keeps the numbers."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mixport import quant
from mixport.artifact import Manifest
from mixport.engine import quant_inputs
from mixport.engine.network import check_plugin_version
from mixport.errors import BuildError
from tests.conftest import QUANT_SCHEMES
from tests.helpers import invoke


@pytest.mark.parametrize("name", list(QUANT_SCHEMES))
def test_quantized_export_builds_with_and_without_plugins(
        name: str, quantized_export: Callable[[str], Path], trt_module: ModuleType, tmp_path: Path) -> None:
    """`mixport build`: every MoE node a version-2 plugin layer (int4 expert weights as INT8 bytes),
    the attention's blocked DequantizeLinear -> MatMul parsed; then --no-plugins (bodies inlined)."""
    folder = tmp_path / "export"
    shutil.copytree(quantized_export(name), folder)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    nodes = Counter(n.op_type for n in model.graph.node if n.domain == "mixport")
    res = invoke("build", folder)
    assert res.exit_code == 0, res.output
    record = Manifest.read(folder).engine
    assert Counter(layer["plugin"] for layer in record.plugin_layers) == Counter(
        {f"mixport::{op}": n for op, n in nodes.items()})
    res = invoke("build", folder, "--no-plugins", "--force")
    assert res.exit_code == 0, res.output
    assert Manifest.read(folder).engine.plugin_layer_count == 0


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def test_int4_experts_keep_their_external_bytes(tmp_path: Path) -> None:
    """Even F and H: only the type and dims change; the data stays in its file at its offset."""
    from onnx.external_data_helper import convert_model_to_external_data

    q = quant.quantize(np.random.default_rng(0).standard_normal((2, 8, 12)).astype(np.float32),
                       quant.Scheme(4, 32)).q
    import onnx_ir as ir

    tensor = ir.serde.serialize_tensor(ir.tensor(q, name="w"))
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.INT4, None)], [tensor])
    model = helper.make_model(graph)
    convert_model_to_external_data(model, location="w.bin", size_threshold=0)
    onnx.save(model, str(tmp_path / "m.onnx"))
    loaded = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    w = _initializer(loaded, "w")
    before = {e.key: e.value for e in w.external_data}
    quant_inputs.retype_int4(w, 2, tmp_path)
    assert w.data_type == TensorProto.INT8 and list(w.dims) == [2, 8, 6]
    assert w.data_location == TensorProto.EXTERNAL and {e.key: e.value for e in w.external_data} == before
    # odd segments (F = 3 per half): repacked in memory, each half of a row from a byte boundary
    odd = numpy_helper.from_array(q[:, :, :6], "odd")
    quant_inputs.retype_int4(odd, 2, tmp_path)
    assert list(odd.dims) == [2, 8, 4] and not odd.external_data


@pytest.mark.parametrize("block", [0, 32])
def test_zero_points_become_exact_int8(block: int) -> None:
    """UINT4 + zero points (which TensorRT cannot import) -> INT8 (q - z): ONNX Runtime gives the
    same outputs before and after (blocked along the input axis, or per column)."""
    import onnxruntime as ort

    rng = np.random.default_rng(block)
    w = rng.standard_normal((40, 6)).astype(np.float32)
    qz = quant.quantize(w, quant.Scheme(4, 32, symmetric=False), axis=0)
    scale, zero = (qz.scale, qz.zero) if block else (qz.scale[0], qz.zero[0])
    inits = [numpy_helper.from_array(qz.q, "q"), numpy_helper.from_array(scale, "s"),
             numpy_helper.from_array(zero, "z")]
    attrs = {"axis": 0, "block_size": block} if block else {"axis": 1}
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], **attrs),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 40])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    x = rng.standard_normal((3, 40)).astype(np.float32)

    def run(m: onnx.ModelProto) -> np.ndarray:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
            None, {"x": x})[0]

    before = run(model)
    assert quant_inputs.zero_points_to_int8(model, Path(".")) == 1
    assert [t.data_type for t in model.graph.initializer] == [TensorProto.FLOAT, TensorProto.INT8]
    assert len(model.graph.node[0].input) == 2
    np.testing.assert_array_equal(run(model), before)


def test_moe_versions_are_checked() -> None:
    inputs = ["h", "w", "i", "gu", "d"]
    quantized = helper.make_node("MoE", [*inputs, "gs", "ds"], ["o"], domain="mixport", name="moe", bits=4,
                                 block_size=32)
    check_plugin_version(quantized)  # no plugin_version: read as "2" from its bits
    for node in (helper.make_node("MoE", [*inputs, "gs", "ds"], ["o"], domain="mixport", name="moe", bits=4,
                                  block_size=32, plugin_version="1"),
                 helper.make_node("MoE", inputs, ["o"], domain="mixport", name="moe", plugin_version="2"),
                 helper.make_node("MoE", inputs, ["o"], domain="mixport", name="moe", plugin_version="4"),
                 helper.make_node("MoE", [*inputs, "gs", "ds", "gb", "db"], ["o"], domain="mixport", name="moe",
                                  bits=4, block_size=32, plugin_version="3")):  # quantized + biases: no plugin
        with pytest.raises(BuildError, match="plugin_version"):
            check_plugin_version(node)
