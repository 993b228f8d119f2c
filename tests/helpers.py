"""Helpers shared by the test modules: the CLI in-process, the one-line error contract."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx
from click.testing import CliRunner, Result

from mixport import artifact
from mixport.cli import main


def has_gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def invoke(*args: object) -> Result:
    """`mixport ARGS...` through click's CliRunner (stdout and stderr both in ``.output``)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result: Result, *fragments: str) -> str:
    """Exit 1, exactly one `error:` line holding every fragment, no traceback; returns the line."""
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def reexport_changed(folder: Path) -> None:
    """What a re-export does to a folder: a different model.onnx, the manifest's hash updated."""
    model = onnx.load(str(folder / "model.onnx"))
    onnx.helper.set_model_props(model, {"re-exported": "yes"})
    onnx.save(model, str(folder / "model.onnx"))
    manifest = artifact.Manifest.read(folder)
    dataclasses.replace(manifest, onnx_sha256=artifact.file_sha256(folder / "model.onnx")).write(folder)
