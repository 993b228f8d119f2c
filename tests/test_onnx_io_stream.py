"""Stacked and quantized weights written a part at a time (onnx_io.WeightFiles.add_stacked / reserve,
quant.quantize_rows): the same bytes and TensorProtos as writing the whole array, and memory that
holds one part, not the stack."""

from __future__ import annotations

import copy
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mixport import artifact, onnx_io, quant
from mixport.passes import run_passes
from mixport.tools.moe_layer import LayerSpec, dense_layer

BF16 = onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.BFLOAT16)


def _values(dtype: np.dtype, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype) in (quant.INT4, quant.UINT4, np.dtype(np.int8)):
        lo = 0 if np.dtype(dtype) == quant.UINT4 else -8
        return rng.integers(lo, lo + 16, shape).astype(np.int8).astype(dtype)
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


def _whole_and_streamed(tmp_path: Path, arrays: list[np.ndarray], stream: object) -> tuple[bytes, bytes, list, list]:
    """Work-file bytes and TensorProtos of ``add`` of each array, and of ``stream(files, arrays)``."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = onnx_io.WeightFiles(tmp_path / "a", tmp_path / "a" / ".w.data")
    want = [whole.add(f"t{i}", a) for i, a in enumerate(arrays)]
    parts = onnx_io.WeightFiles(tmp_path / "b", tmp_path / "b" / ".w.data")
    got = stream(parts, arrays)  # type: ignore[operator]
    return (tmp_path / "a" / ".w.data").read_bytes(), (tmp_path / "b" / ".w.data").read_bytes(), want, got


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16, np.int8, quant.INT4, quant.UINT4],
                         ids=["fp32", "fp16", "bf16", "int8", "int4", "uint4"])
@pytest.mark.parametrize("shape", [(4, 6, 10), (3, 5, 7)], ids=["even", "odd"])  # odd: 4-bit parts share bytes
def test_add_stacked_writes_the_bytes_of_np_stack(dtype: np.dtype, shape: tuple[int, ...], tmp_path: Path) -> None:
    stacks = [_values(dtype, shape, seed) for seed in (0, 1)]  # two tensors: the second starts aligned after one
    written: list[str] = []

    def stream(files: onnx_io.WeightFiles, arrays: list[np.ndarray]) -> list[onnx.TensorProto]:
        files.on_write = written.append
        return [files.add_stacked(f"t{i}", (part for part in a), len(a)) for i, a in enumerate(arrays)]

    want_bytes, got_bytes, want, got = _whole_and_streamed(tmp_path, stacks, stream)
    assert got_bytes == want_bytes and got == want
    assert written == ["t0", "t1"]
    back = numpy_helper.to_array(got[1], str(tmp_path / "b"))
    np.testing.assert_array_equal(back.astype(np.float32), stacks[1].astype(np.float32))


@pytest.mark.parametrize("dtype", [np.float16, quant.INT4], ids=["fp16", "int4"])
def test_reserved_regions_filled_side_by_side(dtype: np.dtype, tmp_path: Path) -> None:
    """Two tensors reserved up front and filled alternately, in uneven pieces (odd ones for 4-bit):
    the same file and pointers as adding each whole, one after the other."""
    a, b = _values(dtype, (7, 9), 0), _values(dtype, (3, 5, 3), 1)

    def stream(files: onnx_io.WeightFiles, arrays: list[np.ndarray]) -> list[onnx.TensorProto]:
        slots = [files.reserve(f"t{i}", x.dtype, x.shape) for i, x in enumerate(arrays)]
        flat = [x.reshape(-1) for x in arrays]
        for lo, hi in ((0, 1), (1, 10), (10, 23), (23, 63)):
            for slot, values in zip(slots, flat, strict=True):
                slot.write(values[lo:hi])
        return [slot.close() for slot in slots]

    want_bytes, got_bytes, want, got = _whole_and_streamed(tmp_path, [a, b], stream)
    assert got_bytes == want_bytes and got == want


def test_a_slot_refuses_what_does_not_fit(tmp_path: Path) -> None:
    files = onnx_io.WeightFiles(tmp_path, tmp_path / ".w.data")
    slot = files.reserve("t", np.float16, (2, 3))
    with pytest.raises(ValueError, match="does not fit"):
        slot.write(np.zeros(3, np.float32))  # another dtype
    slot.write(np.zeros(4, np.float16))
    with pytest.raises(ValueError, match="does not fit"):
        slot.write(np.zeros(3, np.float16))  # past the end
    with pytest.raises(ValueError, match="4 of 6 elements written"):
        slot.close()
    with pytest.raises(ValueError, match="no parts"):
        files.add_stacked("u", iter(()), 0)
    with pytest.raises(ValueError, match="no work file"):
        onnx_io.WeightFiles(tmp_path).reserve("v", np.float16, (2,))


@pytest.mark.parametrize("scheme", [quant.Scheme(8, 32), quant.Scheme(4, 32), quant.Scheme(4, 64, symmetric=False)],
                         ids=["int8", "int4", "int4-zp"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=["fp32", "fp16", "bf16"])
def test_quantize_rows_joins_to_quantize(scheme: quant.Scheme, dtype: np.dtype) -> None:
    """Row chunks of whole blocks (the last one partial, 200 rows = 6.25 blocks of 32) give
    quantize's q, scale and zero exactly, whatever the chunk size."""
    w = _values(dtype, (200, 24))
    want = quant.quantize(w, scheme, axis=0)
    for chunk in (1, 32 * 24 * 2, 10**9):
        parts = list(quant.quantize_rows(w, scheme, chunk_values=chunk))
        assert len(parts) == (-(-200 // scheme.block_size) if chunk == 1 else 1 if chunk == 10**9 else len(parts))
        for field in ("q", "scale", "zero"):
            got = [getattr(p, field) for p in parts]
            if getattr(want, field) is None:
                assert all(g is None for g in got)
                continue
            joined = np.concatenate(got)
            assert joined.dtype == getattr(want, field).dtype
            assert joined.tobytes() == getattr(want, field).tobytes()


def _file_backed(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    onnx.save_model(copy.deepcopy(model), str(folder / "traced.onnx"), save_as_external_data=True,
                    location=artifact.TRACED_DATA, size_threshold=1024)
    return onnx.load(str(folder / "traced.onnx"), load_external_data=False)


def _arrays(model: onnx.ModelProto, base_dir: Path | None = None) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t, str(base_dir or "")) for t in model.graph.initializer}


@pytest.mark.parametrize("precision,zp", [("int8", False), ("int4", False), ("int4", True)],
                         ids=["int8", "int4", "int4-zp"])
def test_quantized_stacks_in_files_are_quantize_of_the_stack(precision: str, zp: bool, tmp_path: Path) -> None:
    """The quantize pass on file-backed weights (written a few rows at a time) gives exactly the
    in-memory pass's tensors, and those are ``quant.quantize`` of the whole stacked experts."""
    model = dense_layer(LayerSpec(hidden=64, inter=96, experts=4, k=2))
    options = quant.QuantOptions(quant.Scheme.parse(precision, 32, zp))
    in_memory = run_passes(copy.deepcopy(model), "portable", quantize=options).model
    on_disk = run_passes(_file_backed(model, tmp_path), "portable", weights_dir=tmp_path, quantize=options).model
    assert [n.op_type for n in on_disk.graph.node] == [n.op_type for n in in_memory.graph.node]
    got, want = _arrays(on_disk, tmp_path), _arrays(in_memory)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].tobytes() == want[name].tobytes(), name
    fused = _arrays(run_passes(copy.deepcopy(model), "portable").model)
    stacks = {n: a for n, a in fused.items() if a.ndim == 3}
    assert len(stacks) == 2
    for name, stack in stacks.items():
        qz = quant.quantize(stack, options.scheme, axis=1)
        assert got[f"{name}_quantized"].tobytes() == qz.q.tobytes()
        assert got[f"{name}_scale"].tobytes() == qz.scale.tobytes()
        if zp:
            assert got[f"{name}_zero_point"].tobytes() == qz.zero.tobytes()  # type: ignore[union-attr]


def _peak_of_passes(model: onnx.ModelProto, folder: Path, quantize: quant.QuantOptions | None) -> int:
    """tracemalloc's peak (numpy's buffers included) of run_passes on file-backed weights."""
    spilled = _file_backed(model, folder)
    tracemalloc.start()
    try:
        run_passes(spilled, "portable", weights_dir=folder, quantize=quantize)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("precision", [None, "int8", "int4"])
def test_fusing_and_quantizing_hold_one_expert_not_the_stack(precision: str | None, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """16 experts of 512 x 1024 (fp32): a layer's stacked gate|up is 64 MB, one expert's 4 MB. Fusing
    (and quantizing, 32 K values at a time: an expert is 32 such chunks, as at real size it is ~28)
    file-backed weights must peak near one expert's slab, not at the stack (built in memory, the
    stacks took more than twice the stacked gate|up; quantized, more than that again)."""
    monkeypatch.setattr(quant, "CHUNK_VALUES", 1 << 15, raising=False)
    spec = LayerSpec(hidden=512, inter=1024, experts=16, k=2)
    model = dense_layer(spec)
    expert_gate_up = spec.hidden * 2 * spec.inter * 4
    options = None if precision is None else quant.QuantOptions(quant.Scheme.parse(precision))
    peak = _peak_of_passes(model, tmp_path, options)
    assert peak < 2 * expert_gate_up, \
        f"peak {peak / 2**20:.1f} MB; one expert's gate|up is {expert_gate_up / 2**20:.1f} MB"


def test_slabs_map_one_sub_tensor_each(tmp_path: Path) -> None:
    files = onnx_io.WeightFiles(tmp_path, tmp_path / ".w.data")
    files.add("pad", np.ones(5, np.float16))  # the stack does not start the file
    stack = _values(np.float16, (3, 40, 24))
    pointer = files.add("stack", stack)
    slabs = list(files.slabs(pointer))
    assert len(slabs) == 3
    for got, want in zip(slabs, stack, strict=True):
        assert got.shape == want.shape and not got.flags.writeable  # a map, not a copy
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="do not start on a byte"):
        next(files.slabs(files.add("q", _values(quant.INT4, (3, 40, 24)))))
