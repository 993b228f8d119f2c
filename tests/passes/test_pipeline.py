"""The PIPELINE as a whole: order, targets, export/CLI wiring, and parity with PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from mixport import artifact
from mixport.cli import main
from mixport.errors import PassError
from mixport.exporter.export import export
from mixport.passes import PIPELINE, run_pipeline
from mixport.tools.check import format_report, run_check

from .conftest import fused_folder, moe_nodes, routers


def test_pipeline_is_one_explicit_ordered_list() -> None:
    assert [p.name for p in PIPELINE] == ["fold_constants", "fuse_moe_experts", "quantize_weights", "lower_ort_moe",
                                          "remove_dead"]
    assert [p.name for p in PIPELINE if p.quantizes] == ["quantize_weights"]
    assert [p.name for p in PIPELINE if p.required] == ["fuse_moe_experts"]


def test_counts_per_target(tiny_unfused: onnx.ModelProto) -> None:
    _, portable = run_pipeline(tiny_unfused)
    assert "lower_ort_moe" not in portable and portable["attach_moe_body"] == 1
    _, ort_counts = run_pipeline(tiny_unfused, target="ort")
    assert ort_counts["lower_ort_moe"] == 2 and ort_counts["attach_moe_body"] == 0


def test_unknown_target_is_a_clear_error(tiny_unfused: onnx.ModelProto) -> None:
    with pytest.raises(PassError, match="unknown optimization target.*expected: portable"):
        run_pipeline(tiny_unfused, target="tensorrt")


def test_optimize_twice_only_swaps_the_body(tiny_unfused: onnx.ModelProto) -> None:
    fused, _ = run_pipeline(tiny_unfused)
    again, counts = run_pipeline(fused, target="trt-noplugin")
    assert counts["fuse_moe_experts"] == 0 and len(moe_nodes(again)) == len(routers(again))
    body = next(f for f in again.functions if f.name == "MoE")
    assert "NonZero" not in {n.op_type for n in body.node}


def test_cli_optimize_verbose(exports, tmp_path: Path) -> None:
    src = exports("tiny") / artifact.MODEL_FILE
    out = tmp_path / "fused.onnx"
    result = CliRunner().invoke(main, ["optimize", str(src), "-o", str(out), "--target", "trt-noplugin", "-v"])
    assert result.exit_code == 0, result.output
    assert "pass fuse_moe_experts: 2 rewrites" in result.output
    assert "no match: remove_dead" in result.output  # reasons are shown with -v
    assert out.stat().st_size <= src.stat().st_size
    assert len(moe_nodes(onnx.load(str(out)))) == 2


def test_cli_optimize_reports_failure_without_traceback(tmp_path: Path) -> None:
    from mixport.tools.moe_layer import LayerSpec, dense_layer

    model = dense_layer(LayerSpec(hidden=16, inter=24, experts=4, k=2))
    next(n for n in model.graph.node if n.op_type == "Sigmoid").op_type = "Tanh"  # not SwiGLU any more
    src = tmp_path / "odd.onnx"
    onnx.save_model(model, str(src))
    result = CliRunner().invoke(main, ["optimize", str(src), "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "no silu(gate)" in result.output


@pytest.fixture(scope="module")
def fused_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mixport export` with its defaults: fused."""
    return export(None, tmp_path_factory.mktemp("fused") / "tiny", builtin="tiny").out_dir


def test_export_fuses_by_default(fused_export: Path, exports) -> None:
    manifest = json.loads((fused_export / artifact.MANIFEST).read_text())
    assert manifest["fused"] and manifest["target"] == "portable"
    assert manifest["passes"]["fuse_moe_experts"] == 2
    model = onnx.load(str(fused_export / artifact.MODEL_FILE))
    assert len(moe_nodes(model)) == len(routers(model)) == 2
    unfused = exports("tiny") / artifact.MODEL_FILE
    assert (fused_export / artifact.MODEL_FILE).stat().st_size <= unfused.stat().st_size


def test_fused_export_matches_pytorch(fused_export: Path) -> None:
    report = run_check(fused_export, steps=4)
    assert report.passed, format_report(report)


def test_fused_e4k1_matches_pytorch(exports, tmp_path: Path) -> None:
    report = run_check(fused_folder(exports("e4k1"), tmp_path / "e4k1"), steps=3)
    assert report.passed, format_report(report)


@pytest.mark.slow
def test_fused_fp16_matches_pytorch(exports, tmp_path: Path) -> None:
    report = run_check(fused_folder(exports("fp16"), tmp_path / "fp16"), steps=3)
    assert report.passed, format_report(report)


def test_optimize_external_data_model_streams_and_matches(exports, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """An input with external data is read through memory maps; the output (past a lowered 2 GB
    limit: DST + DST.data) holds the same graph and weights as optimizing the inline file."""
    import numpy as np
    from onnx import numpy_helper

    from mixport.passes import optimize_file

    src = exports("tiny") / artifact.MODEL_FILE
    ext = tmp_path / "src" / "model.onnx"
    ext.parent.mkdir()
    onnx.save_model(onnx.load(str(src)), str(ext), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=1024)
    optimize_file(src, tmp_path / "inline" / "fused.onnx")
    monkeypatch.setattr(artifact, "TWO_GB", 1 << 16)
    optimize_file(ext, tmp_path / "out" / "fused.onnx")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fused.onnx", "fused.onnx.data"]
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == ["model.onnx", "model.onnx.data"]
    a, b = onnx.load(str(tmp_path / "inline" / "fused.onnx")), onnx.load(str(tmp_path / "out" / "fused.onnx"))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    want = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert want.keys() == got.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_cli_optimize_unreadable_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xff not a protobuf")
    result = CliRunner().invoke(main, ["optimize", str(bad), "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "cannot read the input model" in result.output and not (tmp_path / "out.onnx").exists()
