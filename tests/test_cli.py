"""The CLI through click's CliRunner: the happy path and every bad input (one line, exit 1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mixport.cli import main
from tests.helpers import invoke, one_line_error


def test_export_run_check_builtin(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = invoke("export", "--model", "tiny", "-o", out, "-v")
    assert res.exit_code == 0, res.output
    assert "parity: PASSED" in res.output
    assert "pass fuse_moe_experts: 2 rewrites" in res.output  # -v: counts and no-match reasons
    assert "no match: remove_dead: every node and initializer is used" in res.output
    assert "weights 1/" in res.output  # progress inside the long steps
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == {"builtin": "tiny", "seed": 0}
    assert {"model.onnx", "tokenizer.json", "manifest.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"
    res = invoke("run", out, "--prompt", "The ship sailed", "--max-new-tokens", "8")
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-1].startswith("The ship sailed")
    res = invoke("check", out, "--steps", "3", "--reference", "mixport")
    assert res.exit_code == 0 and "pytorch-mixport vs onnxruntime" in res.output


def test_output_exists_refused(export_copy: Path) -> None:
    before = sorted(p.name for p in export_copy.iterdir())
    one_line_error(invoke("export", "--model", "tiny", "-o", export_copy, "--no-check"),
                     "already exists", "--force")
    assert sorted(p.name for p in export_copy.iterdir()) == before


@pytest.mark.parametrize("case", ["missing-field", "architecture", "pickle-only", "truncated", "no-folder"])
def test_bad_model_folder(case: str, tiny_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    expect = {"missing-field": "lacks the field 'hidden_size'", "architecture": "unsupported architecture",
              "pickle-only": "pickled weights", "truncated": "truncated", "no-folder": "model folder not found"}
    if case == "missing-field":
        del cfg["hidden_size"]
    elif case == "architecture":
        cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    elif case == "pickle-only":
        (src / "model.safetensors").rename(src / "pytorch_model.bin")
    elif case == "truncated":
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    res = invoke("export", src if case != "no-folder" else tmp_path / "nope", "-o", out, "--no-check")
    one_line_error(res, expect[case])
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"], "something half-written was left"


def test_interrupted_export_leaves_no_output(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A failure after tracing (here: while writing) leaves neither OUT_DIR nor a staging folder."""
    from mixport import artifact
    from mixport.exporter.export import export

    def explode(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact.Manifest, "write", explode)
    with pytest.raises(KeyboardInterrupt):
        export(tiny_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_export_is_one_line(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The disk filling up while the passes write the stacked experts: one line with a hint,
    exit 1, and neither OUT nor the staging folder (with its work files) left behind."""
    import errno

    from mixport import onnx_io

    def full(self: object, part: object) -> None:  # every write of a new tensor's bytes goes here
        raise OSError(errno.ENOSPC, "No space left on device", str(self.files.work))  # type: ignore[attr-defined]

    monkeypatch.setattr(onnx_io.TensorSlot, "write", full)
    line = one_line_error(invoke("export", tiny_dir, "-o", tmp_path / "out", "--no-check"),
                          "out of disk space", ".fused.data", "three times")
    assert line.startswith("error: out of disk space")
    assert list(tmp_path.iterdir()) == []


def test_run_errors(export_copy: Path, tmp_path: Path) -> None:
    one_line_error(invoke("run", tmp_path, "--prompt", "x"), "no manifest.json")
    long_prompt = "the " * 600
    one_line_error(invoke("run", export_copy, "--prompt", long_prompt), "longer than the model's context")
    model = export_copy / "model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    one_line_error(invoke("run", export_copy, "--prompt", "x"), "does not match the manifest")


def test_bf16_export_and_cpu_refusal(tmp_path: Path) -> None:
    res = invoke("export", "--model", "tiny", "-o", tmp_path / "bf16", "--dtype", "bf16")
    assert res.exit_code == 0, res.output
    assert "parity check skipped" in res.output
    one_line_error(invoke("run", tmp_path / "bf16", "--prompt", "x"), "cannot run bf16")


def test_run_without_tokenizer_prints_token_ids(export_copy: Path) -> None:
    (export_copy / "tokenizer.json").unlink()
    res = CliRunner().invoke(main, ["run", str(export_copy), "--prompt", "1 5 9", "--max-new-tokens", "5",
                                    "--graph", "portable"])
    assert res.exit_code == 0, res.output
    ids = res.stdout.split()
    assert 1 <= len(ids) <= 5 and all(t.isdigit() for t in ids), res.stdout
    one_line_error(invoke("run", export_copy, "--prompt", "hello"), "no tokenizer")


def test_check_refuses_up_front_without_enough_memory(export_copy: Path, monkeypatch) -> None:  # noqa: ANN001
    """A check that would exhaust memory is refused with one line before loading anything;
    after an export it is skipped with a note (the export itself is complete)."""
    from mixport.runtime import memory

    monkeypatch.setattr(memory, "available_memory", lambda: 100 << 20)
    one_line_error(invoke("check", export_copy), "not enough memory for the parity check", "GB available")
    res = invoke("export", "--model", "tiny", "-o", export_copy, "--force")
    assert res.exit_code == 0, res.output
    assert "parity check skipped: not enough memory" in res.output


@pytest.mark.parametrize("graph", ["auto", "portable"])
def test_run_refuses_weights_that_do_not_fit(export_copy: Path, monkeypatch, graph: str) -> None:  # noqa: ANN001
    """A load whose weights exceed the memory available is one line before anything is loaded (the
    fp16 rule, twice the file on the CPU, is tests/runtime/test_ort_memory.py's)."""
    from mixport.runtime import memory

    size = memory.weight_bytes(export_copy / "model.onnx")
    monkeypatch.setattr(memory, "available_memory", lambda: size - 1)
    one_line_error(invoke("run", export_copy, "--prompt", "hello", "--graph", graph),
                   "the weights do not fit in the memory available", "GB available")
    monkeypatch.setattr(memory, "available_memory", lambda: size + (64 << 20))
    assert invoke("run", export_copy, "--prompt", "hello", "--graph", graph, "--max-new-tokens", "2").exit_code == 0


@pytest.mark.parametrize(("args", "fragment"), [
    (["build", "--dtype", "int8"], "Invalid value for '--dtype': 'int8' is not one of 'fp32', 'fp16', 'bf16'"),
    (["build", "--batch", "1:x:4"], "Invalid value for '--batch': '1:x:4' is not MIN:OPT:MAX"),
    (["build", "--seq", "8:4:2"], "Invalid value for '--seq': '8:4:2' is not MIN:OPT:MAX"),
    (["build", "--past", ""], "Invalid value for '--past': '' is not MIN:OPT:MAX"),
    (["bench", "--batch", "0"], "Invalid value for '--batch': 0 is not in the range x>=1"),
    (["bench", "--runs", "0"], "Invalid value for '--runs': 0 is not in the range x>=1"),
    (["bench", "--new-tokens", "1"], "Invalid value for '--new-tokens': 1 is not in the range x>=2"),
    (["bench", "--prompt-len", "0"], "Invalid value for '--prompt-len': 0 is not in the range x>=1"),
    (["check", "--steps", "-1"], "Invalid value for '--steps': -1 is not in the range x>=0"),
])
def test_bad_option_values_are_usage_errors(args: list[str], fragment: str, tmp_path: Path) -> None:
    """Values no folder could take: click's usage message and exit 2 (not a one-line error, exit 1)."""
    res = invoke(args[0], tmp_path, *args[1:])
    assert res.exit_code == 2, res.output
    assert f"Usage: main {args[0]} [OPTIONS]" in res.output and fragment in res.output, res.output
    assert "Traceback" not in res.output and not [ln for ln in res.output.splitlines() if ln.startswith("error:")]
