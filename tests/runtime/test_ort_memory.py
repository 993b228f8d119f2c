"""Loading without copies: the fast graph's QMoE weights made one expert at a time from the stacked
bytes (equal to the whole-stack conversion), the graph read without its weight bytes
(``onnx_locate.skeleton``), and the portable session's expert slabs read in place (``ort_mapped``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mixport import quant
from mixport.passes import lower_ort_moe, nbits
from mixport.runtime import onnx_locate, ort_mapped, ort_qmoe


@pytest.mark.parametrize("kind", ["int8", "int4", "uint4"])
@pytest.mark.parametrize("fc", ["fc1", "fc2"])
def test_expert_rows_equal_the_whole_stack_conversion(kind: str, fc: str) -> None:
    rng = np.random.default_rng(3)
    e, k, n = 3, 64, 10
    if kind == "int8":
        q = rng.integers(-128, 128, (e, k, n)).astype(np.int8)
        raw, data_type = q.reshape(-1).view(np.uint8), TensorProto.INT8
    else:
        lo, hi = (-8, 8) if kind == "int4" else (0, 16)
        values = rng.integers(lo, hi, (e, k, n))
        q = values.astype(quant.INT4 if kind == "int4" else quant.UINT4)
        raw, data_type = quant.pack_int4(q), TensorProto.INT4 if kind == "int4" else TensorProto.UINT4
    stacked = lower_ort_moe.interleave_columns(q) if fc == "fc1" else q  # nbits' whole-stack conversion
    whole = nbits.expert_rows(stacked, np.ones((e, quant.blocks(k, 32), n), np.float32), None, 32)[0]
    assert np.array_equal(np.stack(list(ort_qmoe.expert_rows(raw, data_type, [e, k, n], fc == "fc1"))), whole)


def _model(tmp: Path, external: bool) -> Path:
    """A graph: out = x @ Gather(stack, 1) + Gather(DequantizeLinear(q, scale), 0) columns summed."""
    rng = np.random.default_rng(0)
    stack = rng.standard_normal((3, 64, 128)).astype(np.float32)  # 96 KB
    q = rng.integers(-8, 8, (2, 64, 128)).astype(quant.INT4)  # 8 KB packed
    scale = rng.random((2, 2, 128)).astype(np.float32) + 0.5  # 2 KB: small, stays in the graph
    inits = [numpy_helper.from_array(stack, "stack"), helper.make_tensor("q", TensorProto.INT4, q.shape,
             quant.pack_int4(q).tobytes(), raw=True), numpy_helper.from_array(scale, "scale")]
    nodes = [helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1, np.int64))),
             helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.int64))),
             helper.make_node("Gather", ["stack", "one"], ["w1"], axis=0),
             helper.make_node("DequantizeLinear", ["q", "scale"], ["dq"], axis=1, block_size=32),
             helper.make_node("Gather", ["dq", "zero"], ["w2"], axis=0),
             helper.make_node("MatMul", ["x", "w1"], ["y1"]), helper.make_node("MatMul", ["x", "w2"], ["y2"]),
             helper.make_node("Add", ["y1", "y2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 128])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    path = tmp / "model.onnx"
    if external:
        onnx.save(model, path, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    else:
        onnx.save(model, path)
    return path


@pytest.mark.parametrize("external", [False, True])
def test_mapped_graph_computes_the_same_without_the_stacks(tmp_path: Path, external: bool) -> None:
    import onnxruntime as ort

    path = _model(tmp_path, external)
    skeleton = onnx_locate.skeleton(path)
    assert skeleton.ByteSize() < 4000  # the 2 KB scale, not the 96 KB stack or the 8 KB of int4
    plain = onnx.load(str(path))
    assert [t.name for t in skeleton.graph.initializer] == [t.name for t in plain.graph.initializer]

    mapped = ort_mapped.mapped(path)
    assert mapped is not None and mapped.slabs == 2
    names = {t.name for t in mapped.proto.graph.initializer}
    assert not names & {"stack", "q", "scale"}  # the whole stacks are gone: only the experts' parts
    assert not [n for n in mapped.proto.graph.node if n.op_type == "Gather"]
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    want = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    opts = ort.SessionOptions()
    opts.add_session_config_entry(ort_mapped.FOLDER_CONFIG, str(tmp_path))
    got = ort.InferenceSession(mapped.proto.SerializeToString(), opts).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)


def test_fp16_on_cpu_counts_twice_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mixport.errors import RuntimeFailure
    from mixport.runtime import memory

    model = tmp_path / "model.onnx"
    model.write_bytes(b"x" * 1000)
    (tmp_path / "model.onnx.data").write_bytes(b"x" * 3000)
    assert memory.weight_bytes(model) == 4000
    assert memory.resident_bytes(model, "fp16", "cpu") == 8000
    assert memory.resident_bytes(model, "fp16", "cuda") == memory.resident_bytes(model, "fp32", "cpu") == 4000
    monkeypatch.setattr(memory, "available_memory", lambda: 6000)
    memory.require(model, "fp32", "cpu")  # fits
    with pytest.raises(RuntimeFailure) as err:
        memory.require(model, "fp16", "cpu")
    assert "computes fp16 weights in fp32" in str(err.value) and "--quantize int8" in str(err.value)
    monkeypatch.setattr(memory, "available_memory", lambda: None)  # unknown: allowed
    memory.require(model, "fp16", "cpu")


@pytest.mark.parametrize(("limit_file", "usage_file", "cache_key"), [
    ("memory.max", "memory.current", "file"), ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache")])
def test_cgroup_room_counts_page_cache_as_free(tmp_path: Path, limit_file: str, usage_file: str,
                                               cache_key: str) -> None:
    from mixport.runtime import memory

    (tmp_path / limit_file).write_text(str(3 << 30))
    (tmp_path / usage_file).write_text(str(2 << 30))
    (tmp_path / "memory.stat").write_text(f"anon 1\n{cache_key} {1 << 30}\n")
    assert memory._room(tmp_path, limit_file, usage_file, cache_key) == 2 << 30
    (tmp_path / limit_file).write_text("max\n" if limit_file == "memory.max" else str(1 << 62))
    assert memory._room(tmp_path, limit_file, usage_file, cache_key) is None  # no limit


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 4, 6)])  # odd experts start inside a byte
@pytest.mark.parametrize("signed", [True, False])
def test_packed4_cuts_and_unpacks_like_the_unpacked_stack(shape: tuple[int, int, int], signed: bool) -> None:
    from mixport.runtime.ort_weights import Packed4

    rng = np.random.default_rng(0)
    v = rng.integers(-8 if signed else 0, 8 if signed else 16, shape).astype(quant.INT4 if signed else quant.UINT4)
    packed = Packed4(quant.pack_int4(v), shape, signed)
    assert packed.shape == shape and packed.dtype == v.dtype and packed.size == v.size
    assert np.array_equal(np.asarray(packed).astype(np.int8), v.astype(np.int8))
    for e in range(shape[0]):
        for cols in (slice(None), slice(0, 3), slice(3, None)):
            cut = packed[e, :, cols]
            assert cut.shape == v[e, :, cols].shape and cut.dtype == v.dtype
            assert np.array_equal(np.asarray(cut).astype(np.int8), v[e, :, cols].astype(np.int8))
    joined = np.concatenate([packed[1, :, :3], packed[1, :, 3:]], axis=1)
    assert np.array_equal(joined.astype(np.int8), v[1].astype(np.int8))
    with pytest.raises(TypeError):
        packed[0, 1:]  # only whole experts are cut


def test_dequantized_portable_load_counts_fp32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mixport.errors import RuntimeFailure
    from mixport.runtime import memory

    path = _model(tmp_path, external=True)  # 96 KB fp32 stack + 8192 int4 values + 2 KB scale
    fp32 = 3 * 64 * 128 * 4 + 2 * 64 * 128 * 4 + 2 * 2 * 128 * 4
    assert memory._dequantized_bytes(path) == fp32
    assert memory.resident_bytes(path, "fp32", "cpu", dequantized=True) == int(memory.FOLD_PEAK * fp32)
    monkeypatch.setattr(memory, "available_memory", lambda: fp32)
    memory.require(path, "fp32", "cpu")  # the file fits
    with pytest.raises(RuntimeFailure) as err:
        memory.require(path, "fp32", "cpu", dequantized=True)
    assert "dequantizes the quantized weights to fp32" in str(err.value) and "default graph" in str(err.value)
