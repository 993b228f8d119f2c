"""`mixport check` on a quantized folder: the error table against the fp32 source, its limits, --text,
--reference dequantized. Real `--quantize` exports of the tiny model (conftest's session fixture)."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mixport import artifact, ops
from tests.helpers import invoke, one_line_error


@pytest.fixture(scope="module")
def int4_report(quantized_export: Callable[[str], Path]):  # -> QuantReport
    from mixport.tools.check_quant import run_quant_check

    return run_quant_check(quantized_export("int4"), steps=6, prefer_transformers=False)


def _break_scale(src: Path, dst: Path, how: str) -> Path:
    """A copy of a quantized export whose first MoE node's gate_up scale is wrong: expert 3's x 4
    ("x4"), or expert 0's for every expert ("shared"); the file stays valid ONNX (onnx.checker)."""
    shutil.copytree(src, dst)
    proto = onnx.load(str(dst / artifact.MODEL_FILE))
    moe = next(n for n in proto.graph.node if n.domain == ops.DOMAIN and n.op_type == ops.MOE)
    name = moe.input[len(ops.MOE_INPUTS)]  # gate_up_scale [E, ceil(H/B), 2F]
    init = next(i for i in proto.graph.initializer if i.name == name)
    scale = numpy_helper.to_array(init).copy()
    if how == "x4":
        scale[3] *= 4
    else:
        scale[:] = scale[0]
    init.CopyFrom(numpy_helper.from_array(scale, name))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(dst / artifact.MODEL_FILE))
    manifest = artifact.Manifest.read(dst)  # as if the export had written it: the check compares it as is
    dataclasses.replace(manifest, onnx_sha256=artifact.file_sha256(dst / artifact.MODEL_FILE), stamps={}).write(dst)
    return dst


def test_a_correct_int4_export_passes_with_the_table(int4_report) -> None:  # noqa: ANN001
    from mixport.tools.check_quant import format_quant_report

    report = int4_report
    assert report.passed, report.failures()
    ort = report.backends[0]
    assert ort.name == "onnxruntime" and ort.skipped is None
    logits = ort.outputs[0]
    assert 0 < logits.rms_rel <= report.limits.rms_logit  # a real error, within the limit
    assert ort.implementation < 1e-3 * logits.scale  # model.onnx computes the dequantized model exactly
    assert len(ort.routing) == 2 and all(r.tokens == ort.positions for r in ort.routing)
    assert len(report.ref_tokens) == 6 and len(ort.greedy) == 6
    table = format_quant_report(report)
    for row in ("err vs dequantized ref", "logits RMS err / scale", "top-1 (teacher-forced)",
                "logits max |err| / scale", "greedy prefix (free-running)", "experts, layer 0", "experts, layer 1"):
        assert row in table
    assert table.splitlines()[-1] == "quantization error: PASSED (limits for int4)"


@pytest.mark.parametrize("how", ["x4", "shared"])
def test_a_broken_scale_exits_3(how: str, quantized_export: Callable[[str], Path], tmp_path: Path) -> None:
    folder = _break_scale(quantized_export("int4"), tmp_path / "broken", how)
    result = invoke("check", str(folder), "--steps", "4", "--reference", "mixport")
    assert result.exit_code == 3, result.output
    assert "quantization error: FAILED" in result.stdout and "implementation error" in result.stdout
    if how == "shared":  # gross enough for the quantization-error limits too
        assert "RMS logit error" in result.stdout.splitlines()[-1]


def test_text_perplexity_of_both(quantized_export: Callable[[str], Path], tmp_path: Path) -> None:
    from mixport.exporter.tiny import CORPUS

    text = tmp_path / "text.txt"
    text.write_text(CORPUS, encoding="utf-8")
    result = invoke("check", str(quantized_export("int8")), "--steps", "2", "--reference", "mixport",
                    "--text", str(text))
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if line.strip().startswith("perplexity"))
    ref = float(row.split("(ref ")[1].split(")")[0])
    ppl, ratio = row.split("x1.02")[1].split()[:2]
    assert 1 < ref < 512 * 4 and abs(float(ppl) / ref - float(ratio[1:])) < 1e-3  # both scored, ratio shown


def test_perplexity_is_exp_mean_nll_and_chunks_agree() -> None:
    """Chunked scoring (each chunk continuing the cache) gives what one pass gives, and exp(mean NLL)."""
    from mixport.tools.quant_metrics import perplexity

    rng = np.random.default_rng(0)
    table = rng.standard_normal((7, 5))  # logits at position t depend on t only (a model with no cache)
    tokens = [0, 3, 1, 4, 4, 2, 0]

    def infer(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"logits": table[feed["position_ids"][0]][None]}

    logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
    want = np.exp(-np.mean([logp[t, tokens[t + 1]] for t in range(6)]))
    assert perplexity(infer, tokens, [], chunk=7) == pytest.approx(want, rel=1e-12)
    assert perplexity(infer, tokens, [], chunk=3) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(("content", "fragment"), [(None, "was not found"), (b"\xff\xfe\x00bad", "not UTF-8"),
                                                   (b"", "too short")])
def test_a_bad_text_file_is_one_line(content: bytes | None, fragment: str, quantized_export: Callable[[str], Path],
                                     tmp_path: Path) -> None:
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_bytes(content)
    result = invoke("check", str(quantized_export("int8")), "--text", str(path))
    assert result.exit_code == 1
    one_line_error(result, fragment)


def test_reference_dequantized_is_exact_and_catches_a_broken_scale(quantized_export: Callable[[str], Path],
                                                                   tmp_path: Path) -> None:
    folder = quantized_export("int4-zp")
    good = invoke("check", str(folder), "--steps", "2", "--reference", "dequantized")
    assert good.exit_code == 0, good.output
    assert "atol 0.0001" in good.stdout and "parity: PASSED" in good.stdout
    bad = invoke("check", str(_break_scale(folder, tmp_path / "broken", "x4")), "--steps", "2",
                 "--reference", "dequantized")
    assert bad.exit_code == 3 and "parity: FAILED" in bad.stdout


def test_quantized_only_options_refuse_a_float_folder(tiny_export: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("some text to score", encoding="utf-8")
    for args in (["--reference", "dequantized"], ["--text", str(text)]):
        result = invoke("check", str(tiny_export), *args)
        assert result.exit_code == 1
        one_line_error(result, "not quantized")
