"""Weights kept in files while the graph is worked on (onnx_io.WeightFiles, write_model,
run_passes(weights_dir)). Written data is read back with onnx's own reader, not mixport's."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import external_data_helper, numpy_helper

from mixport import artifact, onnx_io
from mixport.errors import FileSystemError
from mixport.passes import run_passes
from mixport.tools.moe_layer import LayerSpec, dense_layer


def _arrays(model: onnx.ModelProto, base_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Every initializer's value, external data read by onnx (relative to ``base_dir``)."""
    return {t.name: numpy_helper.to_array(t, str(base_dir or "")) for t in model.graph.initializer}


def _fields(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


BF16 = onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.BFLOAT16)  # numpy's bf16 (through onnx)


def _file_backed(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    """``model`` with its initializers of 1 KB+ in ``folder/TRACED_DATA``, not loaded (onnx's writer)."""
    onnx.save_model(copy.deepcopy(model), str(folder / "traced.onnx"), save_as_external_data=True,
                    location=artifact.TRACED_DATA, size_threshold=1024)
    return onnx.load(str(folder / "traced.onnx"), load_external_data=False)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16, np.int64])
def test_work_file_round_trip(dtype: type, tmp_path: Path) -> None:
    written: list[str] = []
    files = onnx_io.WeightFiles(tmp_path, tmp_path / ".w.data", on_write=written.append)
    arrays = [np.arange(n * 3, dtype=np.float32).reshape(n, 3).astype(dtype) for n in (1, 5, 7)]
    protos = [files.add(f"t{i}", a) for i, a in enumerate(arrays)]
    assert written == ["t0", "t1", "t2"]
    for proto, array in zip(protos, arrays, strict=True):
        assert external_data_helper.uses_external_data(proto) and not proto.raw_data
        assert _fields(proto)["location"] == ".w.data"
        assert int(_fields(proto)["offset"]) % onnx_io.ALIGN == 0
        for back in (files.read(proto), numpy_helper.to_array(proto, str(tmp_path))):
            assert back.dtype == array.dtype and back.shape == array.shape
            np.testing.assert_array_equal(back.astype(np.float32), array.astype(np.float32))
    assert isinstance(files.read(protos[0]), np.ndarray) and not files.read(protos[0]).flags.writeable  # a map


def test_work_file_in_another_folder(tmp_path: Path) -> None:
    """`mixport optimize`: weights beside the input, the work file beside the output; locations
    stay relative to the input's folder and resolve into either."""
    (tmp_path / "src").mkdir()
    (tmp_path / "work").mkdir()
    files = onnx_io.WeightFiles(tmp_path / "src", tmp_path / "work" / artifact.FUSED_DATA)
    proto = files.add("w", np.ones((40, 40), np.float32))
    assert _fields(proto)["location"] == f"../work/{artifact.FUSED_DATA}"
    np.testing.assert_array_equal(files.read(proto), np.ones((40, 40), np.float32))


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/hostname"])
def test_location_outside_the_folder_is_refused(location: str, tmp_path: Path) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    (tmp_path / "model").mkdir()
    tensor = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[4])
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    with pytest.raises(FileSystemError, match="outside the model's folder"):
        onnx_io.WeightFiles(tmp_path / "model").read(tensor)


def test_write_inline_and_external_from_file_backed_weights(tmp_path: Path) -> None:
    model = dense_layer(LayerSpec(hidden=32, inter=48, experts=4, k=2))
    want = _arrays(model)
    spilled = _file_backed(model, tmp_path)
    big = [t for t in spilled.graph.initializer if external_data_helper.uses_external_data(t)]
    assert big and all(not t.raw_data for t in big)
    assert spilled.ByteSize() < model.ByteSize() // 10
    np.testing.assert_equal(_arrays(spilled, tmp_path), want)
    files = onnx_io.WeightFiles(tmp_path)

    ticks: list[tuple[int, int]] = []
    inline = copy.deepcopy(spilled)
    assert onnx_io.write_model(inline, tmp_path / "inline.onnx", files, 2**31 - 1,
                               lambda done, total: ticks.append((done, total))) == ["inline.onnx"]
    assert ticks == [(i, len(big)) for i in range(1, len(big) + 1)]
    back = onnx.load(str(tmp_path / "inline.onnx"))
    assert back == model  # one file, parsed as if serialized at once: same graph, order and bytes
    with pytest.raises(ValueError, match="no folder resolves them"):
        onnx_io.write_model(copy.deepcopy(spilled), tmp_path / "x.onnx", None, 2**31 - 1)

    out = tmp_path / "out"
    out.mkdir()
    ext = copy.deepcopy(spilled)
    files_written = onnx_io.write_model(ext, out / "m.onnx", files, 1 << 12)
    assert files_written == ["m.onnx", "m.onnx.data"]
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert {_fields(t)["location"] for t in ext.graph.initializer if external_data_helper.uses_external_data(t)} \
        == {"m.onnx.data"}
    loaded = onnx.load(str(out / "m.onnx"))  # onnx resolves m.onnx.data
    np.testing.assert_equal(_arrays(loaded), want)
    for t in loaded.graph.initializer:  # onnx's loader marks the tensors it filled in as DEFAULT
        t.ClearField("data_location")
    assert loaded == model


def test_external_output_page_aligns_big_tensors(tmp_path: Path) -> None:
    """Past PAGE_ALIGN_OVER bytes a tensor starts on a 4 KB page of model.onnx.data (memory maps)."""
    rng = np.random.default_rng(0)
    odd = numpy_helper.from_array(rng.standard_normal(1031).astype(np.float16), "odd")  # 2062 bytes
    big = numpy_helper.from_array(rng.standard_normal((600, 600)).astype(np.float32), "big")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Add", ["odd", "odd"], ["y"]),
                                    onnx.helper.make_node("Identity", ["big"], ["z"])], "g", [],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, [1031]),
                                    onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [600, 600])],
                                   [odd, big])
    model = onnx.helper.make_model(graph)
    proto = copy.deepcopy(model)
    assert onnx_io.write_model(proto, tmp_path / "m.onnx", None, 1 << 16) == ["m.onnx", "m.onnx.data"]
    placed = {t.name: _fields(t) for t in proto.graph.initializer if external_data_helper.uses_external_data(t)}
    assert list(placed) == ["odd", "big"] and placed["odd"]["offset"] == "0"
    assert int(placed["big"]["offset"]) % onnx_io.PAGE_ALIGN == 0 and int(placed["big"]["offset"]) > 0
    np.testing.assert_equal(_arrays(onnx.load(str(tmp_path / "m.onnx"))), _arrays(model))


PEAK_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np, onnx
from mixport import onnx_io
folder, n, mb, two_gb = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
files = onnx_io.WeightFiles(folder, folder / "work.data")
if sys.argv[5] == "file":
    inits = [files.add(f"w{i}", np.full((mb << 18,), i, np.float32)) for i in range(n)]
else:  # the whole model in memory (the fast ONNX Runtime graph, `mixport optimize` of an inline file)
    inits = [onnx.numpy_helper.from_array(np.full((mb << 18,), i, np.float32), f"w{i}") for i in range(n)]
graph = onnx.helper.make_graph([onnx.helper.make_node("Concat", [t.name for t in inits], ["y"], axis=0)], "g",
                               [], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
proto = onnx.helper.make_model(graph)
def kb(key):
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith(key))
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
before = kb("VmRSS:")
onnx_io.write_model(proto, folder / "m.onnx", files, two_gb)
print(json.dumps({"peak_mb": (kb("VmHWM:") - before) / 1024}))
"""


@pytest.mark.parametrize("source", ["file", "memory"])
@pytest.mark.parametrize("two_gb", [2**31 - 1, 1 << 20], ids=["inline", "external"])
def test_output_is_written_a_tensor_at_a_time(two_gb: int, source: str, tmp_path: Path) -> None:
    """Writing 12 x 16 MB of weights (file-backed, or in the ModelProto) raises the peak RSS by a
    few tensors, not by the model (serializing it at once would take twice the model): inline
    (one file) and model.onnx.data (onnx_ir) alike."""
    n, mb = 12, 16
    res = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path), str(n), str(mb), str(two_gb), source],
                         capture_output=True, text=True, check=True)
    peak = json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]
    assert peak < 5.5 * mb, f"writing {n * mb} MB raised the peak RSS by {peak:.0f} MB"
    back = onnx.load(str(tmp_path / "m.onnx"))
    assert [int(numpy_helper.to_array(t)[-1]) for t in back.graph.initializer] == list(range(n))


@pytest.mark.parametrize("target", ["portable", "ort"])
def test_passes_on_file_backed_weights_match_in_memory(target: str, tmp_path: Path) -> None:
    """The same fused graph and weights whether the weights sit in memory or in files; the stacked
    experts are written to FUSED_DATA, not held in memory."""
    model = dense_layer(LayerSpec(hidden=32, inter=48, experts=4, k=2))
    in_memory = run_passes(copy.deepcopy(model), target).model
    written: list[str] = []
    on_disk = run_passes(_file_backed(model, tmp_path), target, weights_dir=tmp_path, detail=written.append).model
    stacked = [t for t in on_disk.graph.initializer if len(t.dims) == 3]
    assert len(stacked) == 2
    for t in stacked:
        assert _fields(t)["location"] == artifact.FUSED_DATA
    made = [f"wrote {t.name}" for t in stacked]  # each written as its layer was fused (or lowered)
    assert written == made if target == "portable" else (len(written) == 4 and written[2:] == made)
    loaded = [t.name for t in on_disk.graph.initializer if len(t.raw_data) >= 1024]
    assert not loaded, f"the passes materialized weights in memory: {loaded}"
    assert [n.op_type for n in on_disk.graph.node] == [n.op_type for n in in_memory.graph.node]
    np.testing.assert_equal(_arrays(on_disk, tmp_path), _arrays(in_memory))


def test_passes_refuse_external_weights_without_a_folder(tmp_path: Path) -> None:
    model = dense_layer(LayerSpec(hidden=32, inter=48, experts=4, k=2))
    with pytest.raises(ValueError, match="no weight folder is set"):
        run_passes(_file_backed(model, tmp_path), "portable")


FULL_SCRIPT = """
import resource, signal, sys
from pathlib import Path
import numpy as np, onnx
from mixport import onnx_io
from mixport.errors import FileSystemError
folder, two_gb = Path(sys.argv[1]), int(sys.argv[2])
files = onnx_io.WeightFiles(folder, folder / "work.data")
inits = [files.add(f"w{i}", np.full((1 << 18,), i, np.float32)) for i in range(4)]  # 4 x 1 MB
graph = onnx.helper.make_graph([onnx.helper.make_node("Concat", [t.name for t in inits], ["y"], axis=0)], "g",
                               [], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, 3 << 20))  # the "disk" holds 3 MB per file
try:
    onnx_io.write_model(onnx.helper.make_model(graph), folder / "m.onnx", files, two_gb)
except OSError as exc:
    print("error:", FileSystemError.from_os_error(exc))
"""


@pytest.mark.parametrize("two_gb", [2**31 - 1, 1 << 20], ids=["inline", "external"])
def test_a_failed_write_is_an_oserror(two_gb: int, tmp_path: Path) -> None:
    """A write that fails half-way (a file-size limit standing in for a full disk) reaches the caller
    as the OSError itself, not wrapped by onnx_ir: the CLI prints it as one line."""
    res = subprocess.run([sys.executable, "-c", FULL_SCRIPT, str(tmp_path), str(two_gb)],
                         capture_output=True, text=True, check=True)
    assert res.stdout.startswith("error: file access failed: File too large"), res.stdout + res.stderr
    assert len(res.stdout.strip().splitlines()) == 1
