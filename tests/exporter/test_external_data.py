"""Weights kept in files while the graph is worked on (exporter.external_data, run_passes(weights_dir))."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import external_data_helper, numpy_helper

from mixport import artifact
from mixport import onnx_io as external_data
from mixport.passes import run_passes
from mixport.tools.moe_layer import LayerSpec, dense_layer


def _arrays(model: onnx.ModelProto, base_dir: Path | None = None) -> dict[str, np.ndarray]:
    out = {}
    for t in model.graph.initializer:
        if external_data_helper.uses_external_data(t):
            out[t.name] = np.array(external_data.read_array(t, base_dir))
        else:
            out[t.name] = numpy_helper.to_array(t)
    return out


BF16 = onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.BFLOAT16)  # numpy's bf16 (through onnx)


def _file_backed(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    """``model`` with its initializers of 1 KB+ in ``folder/TRACED_DATA``, not loaded (onnx's writer)."""
    onnx.save_model(copy.deepcopy(model), str(folder / "traced.onnx"), save_as_external_data=True,
                    location=artifact.TRACED_DATA, size_threshold=1024)
    return onnx.load(str(folder / "traced.onnx"), load_external_data=False)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16, np.int64])
def test_sink_round_trip(dtype: type, tmp_path: Path) -> None:
    sink = external_data.Sink(tmp_path, ".w.data")
    arrays = [np.arange(n * 3, dtype=np.float32).reshape(n, 3).astype(dtype) for n in (1, 5, 7)]
    protos = [sink.add(f"t{i}", a) for i, a in enumerate(arrays)]
    for proto, array in zip(protos, arrays, strict=True):
        assert external_data_helper.uses_external_data(proto) and not proto.raw_data
        assert int(dict((e.key, e.value) for e in proto.external_data)["offset"]) % external_data.ALIGN == 0
        back = external_data.read_array(proto, tmp_path)
        assert back.dtype == array.dtype and back.shape == array.shape
        np.testing.assert_array_equal(back.astype(np.float32), array.astype(np.float32))


def test_write_inline_and_external_from_file_backed_weights(tmp_path: Path) -> None:
    model = dense_layer(LayerSpec(hidden=32, inter=48, experts=4, k=2))
    want = _arrays(model)
    spilled = _file_backed(model, tmp_path)
    big = [t for t in spilled.graph.initializer if external_data_helper.uses_external_data(t)]
    assert big and all(not t.raw_data for t in big)
    assert spilled.ByteSize() < model.ByteSize() // 10
    np.testing.assert_equal(_arrays(spilled, tmp_path), want)

    inline = copy.deepcopy(spilled)
    assert external_data.write_model(inline, tmp_path / "inline.onnx", tmp_path, 2**31 - 1) == ["inline.onnx"]
    np.testing.assert_equal(_arrays(onnx.load(str(tmp_path / "inline.onnx"))), want)

    out = tmp_path / "out"
    out.mkdir()
    files = external_data.write_model(copy.deepcopy(spilled), out / "m.onnx", tmp_path, 1 << 12)
    assert files == ["m.onnx", "m.onnx.data"]
    np.testing.assert_equal(_arrays(onnx.load(str(out / "m.onnx"))), want)  # onnx resolves m.onnx.data


@pytest.mark.parametrize("target", ["portable", "ort"])
def test_passes_on_file_backed_weights_match_in_memory(target: str, tmp_path: Path) -> None:
    """The same fused graph and weights whether the weights sit in memory or in files; the stacked
    experts are written to FUSED_DATA, not held in memory."""
    model = dense_layer(LayerSpec(hidden=32, inter=48, experts=4, k=2))
    in_memory = run_passes(copy.deepcopy(model), target).model
    on_disk = run_passes(_file_backed(model, tmp_path), target, weights_dir=tmp_path).model
    stacked = [t for t in on_disk.graph.initializer if len(t.dims) == 3]
    assert len(stacked) == 2
    for t in stacked:
        assert dict((e.key, e.value) for e in t.external_data)["location"] == artifact.FUSED_DATA
    loaded = [t.name for t in on_disk.graph.initializer if len(t.raw_data) >= 1024]
    assert not loaded, f"the passes materialized weights in memory: {loaded}"
    assert [n.op_type for n in on_disk.graph.node] == [n.op_type for n in in_memory.graph.node]
    np.testing.assert_equal(_arrays(on_disk, tmp_path), _arrays(in_memory))
