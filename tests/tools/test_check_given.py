"""`mixport check` checks the ONNX file it is given, and keeps other libraries' log lines out.

A changed model.onnx is compared (a note says it changed since export) instead of refused, so a
perturbed expert is a parity failure (exit 3) naming what differs; `--onnx PATH` compares another
file with the folder's source model; the folder's fast graph and engine are never rebuilt from a
changed file; steps beyond the context are refused before anything is loaded; Polygraphy's
`[I]`/`[W]`/`[E]` lines appear only with `-v`, on stderr.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import Result
from onnx import numpy_helper

from mixport import artifact
from mixport.artifact import Manifest
from mixport.errors import CheckUnavailable
from mixport.tools import check_target
from tests.helpers import invoke, one_line_error

GATE_UP = "layers.0.block_sparse_moe.experts.gate_up"
ROUTER = "layers.0.block_sparse_moe.gate.weight"
POLYGRAPHY_LINE = re.compile(r"^\s*\[[IWE]\] ", re.MULTILINE)
FAST = (1, "--reference", "mixport")  # one decode step, mixport's reference: the comparison, quickly


def change_initializer(model_path: Path, name: str, change: callable) -> None:  # type: ignore[valid-type]
    """Replace initializer ``name`` of ``model_path`` (inline or in external data) by ``change(array)``."""
    proto = onnx.load(str(model_path), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.name == name)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        data = model_path.parent / info["location"]
        offset, length = int(info.get("offset", 0)), int(info["length"])
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        with data.open("r+b") as fh:
            fh.seek(offset)
            old = np.frombuffer(fh.read(length), dtype=dtype).reshape(tuple(tensor.dims))
            new = change(old.copy()).astype(dtype)
            fh.seek(offset)
            fh.write(new.tobytes())
    else:
        old = numpy_helper.to_array(tensor)
        new = change(old.copy()).astype(old.dtype)
        tensor.CopyFrom(numpy_helper.from_array(new, name))
        onnx.save(proto, str(model_path))
    assert not np.array_equal(old, new), "the change must change the weights"


def perturb_expert(model_path: Path, expert: int = 3, factor: float = 1.05) -> None:
    """One expert's slab of layer 0's fused gate_up, scaled by 5%."""

    def scale(a: np.ndarray) -> np.ndarray:
        a[expert] *= factor
        return a

    change_initializer(model_path, GATE_UP, scale)


def swap_router_rows(model_path: Path) -> None:
    """Layer 0's router scores expert 0 as expert 1 and back: other experts are picked."""
    change_initializer(model_path, ROUTER, lambda a: a[[1, 0, *range(2, len(a))]])


def fast_graph_state(folder: Path) -> tuple[object, bool]:
    from mixport.runtime import ort_graph

    return Manifest.read(folder).ort_graph, (folder / ort_graph.FILE).exists()


def polygraphy_lines(text: str) -> list[str]:
    return POLYGRAPHY_LINE.findall(text)


def parity_failure(result: Result, *fragments: str) -> str:
    """Exit 3, the report on stdout saying FAILED, one `error:` line naming what differs."""
    assert result.exit_code == 3, result.output
    assert "parity: FAILED" in result.stdout and "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_a_changed_model_onnx_is_compared_and_fails(export_copy: Path) -> None:
    """The unperturbed copy passes; one expert perturbed by 5% (manifest hash left as is) is compared,
    not refused: exit 3 naming the outputs that differ, a note that model.onnx changed, and the fast
    graph neither checked nor built from the changed file. No Polygraphy line without -v."""
    ok = invoke("check", export_copy, "--steps", *FAST)
    assert ok.exit_code == 0, ok.output
    assert "parity: PASSED" in ok.stdout and not polygraphy_lines(ok.output), ok.output
    fast_before = fast_graph_state(export_copy)
    manifest_before = Manifest.read(export_copy)

    perturb_expert(export_copy / artifact.MODEL_FILE)
    res = invoke("check", export_copy, "--steps", *FAST)
    line = parity_failure(res, "logits", "present.1.key")
    assert "present.0.key" not in line  # layer 0's attention comes before its experts: its cache agrees
    assert "[mixport] model.onnx changed since export" in res.stderr
    assert "fast ORT graph: not checked (model.onnx changed since export" in res.stdout
    assert not polygraphy_lines(res.output), res.output
    assert fast_graph_state(export_copy) == fast_before  # neither rebuilt nor recorded from the changed file
    assert Manifest.read(export_copy).onnx_sha256 == manifest_before.onnx_sha256


def test_verbose_shows_polygraphy_lines_on_stderr(export_copy: Path) -> None:
    perturb_expert(export_copy / artifact.MODEL_FILE)
    res = invoke("check", export_copy, "--steps", *FAST, "-v")
    parity_failure(res, "logits")
    shown = polygraphy_lines(res.stderr)
    assert any("[E]" in s for s in shown) and any("[I]" in s for s in shown), res.stderr
    assert "FAILED | Output: 'logits'" in res.stderr
    assert not polygraphy_lines(res.stdout), res.stdout
    assert "'colored' module is not installed" not in res.output


def test_different_routing_fails_naming_the_layer(export_copy: Path) -> None:
    swap_router_rows(export_copy / artifact.MODEL_FILE)
    res = invoke("check", export_copy, "--steps", *FAST)
    parity_failure(res, "routing of layer 0")
    assert re.search(r"^ +layer 0 +\d+ +\d+ +\d+.*FAIL$", res.stdout, re.MULTILINE), res.stdout


def _copy_model(folder: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in (artifact.MODEL_FILE, artifact.DATA_FILE):
        if (folder / name).is_file():
            shutil.copy2(folder / name, dst / name)
    return dst / artifact.MODEL_FILE


def test_onnx_option_compares_another_file(tiny_export: Path, tmp_path: Path) -> None:
    """--onnx: an unperturbed copy passes, a perturbed one fails (exit 3); the folder is untouched
    and its fast graph and engine are not compared with the other file."""
    same = _copy_model(tiny_export, tmp_path / "same")
    ok = invoke("check", tiny_export, "--onnx", same, "--steps", *FAST)
    assert ok.exit_code == 0, ok.output
    assert f"comparing {same} with the source model" in ok.stderr
    assert "fast ORT graph: not checked (--onnx model.onnx is checked" in ok.stdout

    other = _copy_model(tiny_export, tmp_path / "other")
    perturb_expert(other)
    folder_before = artifact.file_sha256(tiny_export / artifact.MODEL_FILE)
    res = invoke("check", tiny_export, "--onnx", other, "--steps", *FAST)
    parity_failure(res, "logits", str(other))
    assert not polygraphy_lines(res.output), res.output
    assert artifact.file_sha256(tiny_export / artifact.MODEL_FILE) == folder_before


def _other_signature(folder: Path, tmp_path: Path, case: str) -> Path:
    path = tmp_path / "other.onnx"
    if case == "not-onnx":
        path.write_bytes(b"this is not a protobuf \xff\xfe")
        return path
    if case == "foreign-graph":
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
        y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
        graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
        onnx.save(onnx.helper.make_model(graph), str(path))
        return path
    proto = onnx.load(str(folder / artifact.MODEL_FILE), load_external_data=False)
    if case == "int32-ids":
        proto.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT32
    elif case == "kv-heads":
        past = next(i for i in proto.graph.input if i.name.startswith("past_key_values"))
        past.type.tensor_type.shape.dim[1].dim_value = 4
    elif case == "missing-output":
        del proto.graph.output[-1]
    onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize(("case", "fragment"), [
    ("not-onnx", "not a readable ONNX model"),
    ("foreign-graph", "no input 'input_ids'"),
    ("int32-ids", "input 'input_ids' is int32, the export's is int64"),
    ("kv-heads", "has shape [batch, 4, past_seq, 16], the export's is [batch, 2, past_seq, 16]"),
    ("missing-output", "no output 'present.1.value'"),
])
def test_onnx_option_with_another_signature_is_one_line(tiny_export: Path, tmp_path: Path, case: str,
                                                        fragment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _loads_nothing_heavy(monkeypatch)
    other = _other_signature(tiny_export, tmp_path, case)
    one_line_error(invoke("check", tiny_export, "--onnx", other), fragment, str(other))


def test_onnx_option_without_routing_nodes_is_one_line(tiny_export: Path, tmp_path: Path) -> None:
    """Same inputs and outputs, but no TopKRouting nodes: the experts picked cannot be compared."""
    proto = onnx.load(str(tiny_export / artifact.MODEL_FILE))
    for node in proto.graph.node:
        if node.domain == "mixport" and node.op_type == "TopKRouting":
            node.op_type = "TopKRoutingRenamed"
    path = tmp_path / "norouting.onnx"
    onnx.save(proto, str(path))
    one_line_error(invoke("check", tiny_export, "--onnx", path, "--steps", *FAST), "0 mixport::TopKRouting nodes",
                   "expected: 2 (one per MoE layer)")


def test_onnx_option_missing_file_is_a_usage_error(tiny_export: Path, tmp_path: Path) -> None:
    res = invoke("check", tiny_export, "--onnx", tmp_path / "nope.onnx")
    assert res.exit_code == 2 and "does not exist" in res.output, res.output


def _loads_nothing_heavy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tripwire: loading the reference model (what makes a check take minutes) fails the test."""
    from mixport.exporter import loader

    def tripped(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the check loaded the reference model")

    monkeypatch.setattr(loader, "load_reference", tripped)


def test_steps_beyond_the_context_are_refused_before_loading(tiny_export: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """12 prompt tokens + 501 steps > 512 positions: one line, exit 1, nothing loaded."""
    context = Manifest.read(tiny_export).config["max_position_embeddings"]
    assert context == 512
    _loads_nothing_heavy(monkeypatch)
    one_line_error(invoke("check", tiny_export, "--steps", 501), "beyond the model's context",
                   "12 prompt tokens + 501 decode steps = 513 positions", "at most 512", "--steps 500 or fewer")
    one_line_error(invoke("check", tiny_export, "--steps", 10**9), "beyond the model's context")


def test_step_limits_in_the_library(tiny_export: Path) -> None:
    """run_check(steps=-1) was an UnboundLocalError; the last step inside the context is accepted."""
    from mixport.tools.check import run_check

    manifest = Manifest.read(tiny_export)
    check_target.require_steps(manifest, 500, 12)  # 512 positions: the whole context
    check_target.require_steps(manifest, 0, 12)
    for steps, prompt in ((-1, 12), (True, 12), (2.5, 12), (501, 12), (8, 0)):
        with pytest.raises(CheckUnavailable):
            check_target.require_steps(manifest, steps, prompt)  # type: ignore[arg-type]
    with pytest.raises(CheckUnavailable, match="whole number >= 0"):
        run_check(tiny_export, steps=-1)


def test_signature_rules() -> None:
    sig = artifact.TensorSig
    want = {"inputs": [sig("a", "float", ["batch", 2, 16])], "outputs": [sig("y", "float", ["batch"])]}
    renamed_dims = {"inputs": [sig("a", "float", ["n", 2, 16])], "outputs": [sig("y", "float", ["m"])]}
    assert check_target.signature_problem(want, renamed_dims) is None  # a symbolic dim matches any symbolic dim
    fixed = {"inputs": [sig("a", "float", [1, 2, 16])], "outputs": [sig("y", "float", ["batch"])]}
    assert "has shape [1, 2, 16]" in str(check_target.signature_problem(want, fixed))
    rank = {"inputs": [sig("a", "float", ["batch", 2])], "outputs": [sig("y", "float", ["batch"])]}
    assert check_target.signature_problem(want, rank) is not None
    extra = {"inputs": want["inputs"] + [sig("b", "float", [])], "outputs": want["outputs"]}
    assert check_target.signature_problem(want, extra) == "an extra input 'b'"


def test_changed_weights_file_is_noticed(export_copy: Path) -> None:
    """changed_since_export names model.onnx.data too (an export past 2 GB keeps its weights there)."""
    manifest = Manifest.read(export_copy)
    assert check_target.changed_since_export(export_copy, manifest) == []
    data = export_copy / artifact.DATA_FILE
    data.write_bytes(b"\0" * 16)
    with_data = dataclasses.replace(manifest, data_sha256="0" * 64)
    assert check_target.changed_since_export(export_copy, with_data) == [artifact.DATA_FILE]
    perturb_expert(export_copy / artifact.MODEL_FILE)
    assert check_target.changed_since_export(export_copy, with_data) == [artifact.MODEL_FILE, artifact.DATA_FILE]
