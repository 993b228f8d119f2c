"""``mixport export``: HF folder -> reference model -> ONNX -> passes -> export folder."""

from __future__ import annotations

import contextlib
import gc
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mixport
from mixport import artifact, folder_check
from mixport.errors import ConfigError
from mixport.exporter.config import load_config

if TYPE_CHECKING:
    import onnx

    from mixport.quant import QuantOptions

BUILTIN_MODELS = ("tiny",)


@dataclass
class ExportResult:
    out_dir: Path
    files: list[str]
    pass_counts: dict[str, int] = field(default_factory=dict)
    pass_reasons: list[str] = field(default_factory=list)  # why pass patterns did not match (-v)
    manifest: artifact.Manifest | None = None


def _check_source(model_dir: Path | None, builtin: str | None) -> None:
    if (model_dir is None) == (builtin is None):
        raise ConfigError("give exactly one model source", given=f"MODEL_DIR={model_dir}, --model={builtin}",
                          expected="a Hugging Face folder or --model tiny")
    if builtin is not None and builtin not in BUILTIN_MODELS:
        raise ConfigError("unknown built-in model", given=builtin, expected=" | ".join(BUILTIN_MODELS))
    if model_dir is not None and not Path(model_dir).is_dir():
        raise ConfigError("model folder not found", given=str(model_dir), expected="a Hugging Face model folder")


def check_request(model_dir: Path | None, out_dir: Path, *, builtin: str | None = None,
                  force: bool = False, fuse: bool = True, quantize: QuantOptions | None = None) -> None:
    """Refuse a bad ``export`` request in about a second, before torch is imported and before
    anything is written: one model source (a folder with a config.json mixport reads, or a
    built-in name) and an OUT_DIR that may be written (``artifact.check_target``)."""
    _check_source(model_dir, builtin)
    if quantize is not None and not fuse:
        raise ConfigError("--quantize quantizes the fused experts", given="--quantize with --no-fuse",
                          expected="a fused export", hint="drop --no-fuse")
    if model_dir is not None:
        load_config(Path(model_dir))
    artifact.check_target(out_dir, force, _sources(model_dir))


def _sources(model_dir: Path | None) -> list[Path]:
    return [] if model_dir is None else [Path(model_dir)]


@contextlib.contextmanager
def resolve_source(model_dir: Path | None, builtin: str | None) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A readable HF folder plus how to find it again (path, or builtin name + seed)."""
    _check_source(model_dir, builtin)
    if builtin is not None:
        from mixport.exporter.tiny import write_tiny

        with tempfile.TemporaryDirectory(prefix="mixport-tiny-") as tmp:
            yield write_tiny(Path(tmp)), {"builtin": builtin, "seed": 0}
        return
    assert model_dir is not None  # _check_source: exactly one source
    path = Path(model_dir)
    yield path, {"path": str(path.absolute())}


def _quiet_exporter() -> None:
    for name in ("torch.onnx", "torch._export", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


def export(model_dir: Path | None, out_dir: Path, *, builtin: str | None = None, dtype: str = "fp32",
           force: bool = False, fuse: bool = True, progress: Callable[[str], None] | None = None,
           detail: Callable[[str], None] | None = None, notice: Callable[[str], None] | None = None,
           quantize: QuantOptions | None = None) -> ExportResult:
    """Export MODEL_DIR (or a built-in model) into OUT_DIR atomically; returns what was written.
    ``progress(step)`` names each step, ``detail(text)`` says how far a long one is, ``notice(line)``
    hears of a dead export's staging folder removed (default: stderr). ``quantize``: weight-only
    quantization of the fused graph (``passes.quantize_weights``)."""
    step = progress or (lambda _msg: None)
    weights_done = None if detail is None else (lambda i, n: detail(f"weights {i}/{n}"))
    check_request(model_dir, out_dir, builtin=builtin, force=force, fuse=fuse, quantize=quantize)
    from mixport.exporter import tokenizer_files
    from mixport.exporter.loader import load_for_export
    from mixport.exporter.trace import trace

    _quiet_exporter()
    with resolve_source(model_dir, builtin) as (src, source_info):
        tokenizer_files.check(src)  # parsed before anything is written (and copied later, as checked)
        step("loading weights")
        model, weights, cfg, config_hash = load_for_export(src, dtype)
        with artifact.staging_dir(out_dir, force, _sources(model_dir), notice) as tmp:
            step("tracing to ONNX")
            proto = trace(model, weights, spill_dir=tmp, on_tensor=weights_done)  # streamed to tmp
            del weights
            gc.collect()
            counts: dict[str, int] = {}
            reasons: list[str] = []
            if fuse:
                step("fusing experts")
                proto, counts, reasons = _run_passes(proto, tmp, detail, quantize)
                gc.collect()
            step("writing files")
            folder_check.record_config(proto, asdict(cfg))  # the manifest's config, covered by the hash
            files = artifact.save_model(proto, tmp, weights_dir=tmp, on_tensor=weights_done)
            artifact.remove_work_files(tmp)
            files += artifact.copy_tokenizer(src, tmp)
            stamps = artifact.stamps_of(tmp, files)  # model.onnx (+ model.onnx.data)
            data = stamps.get(artifact.DATA_FILE)
            manifest = artifact.Manifest(
                mixport_version=mixport.__version__, source=artifact.Source(**source_info),
                config_sha256=config_hash, dtype=dtype, opset=max(o.version for o in proto.opset_import
                                                                  if o.domain in ("", "ai.onnx")),
                onnx_sha256=stamps[artifact.MODEL_FILE].sha256, data_sha256=data and data.sha256, stamps=stamps,
                fused=bool(counts), passes=counts, target="portable" if fuse else None, files=files,
                config=asdict(cfg), **artifact.io_signature(proto), cache=artifact.cache_record(proto),
                quantization=None if quantize is None else artifact.QuantRecord(**quantize.record()))
            manifest.write(tmp)
    return ExportResult(Path(out_dir), files, counts, reasons, manifest)


def _run_passes(proto: onnx.ModelProto, weights_dir: Path, detail: Callable[[str], None] | None,
                quantize: QuantOptions | None) -> tuple[onnx.ModelProto, dict[str, int], list[str]]:
    """The fusion pipeline (mixport.passes): the fused model, {pass: rewrites}, no-match reasons."""
    from mixport.passes import run_passes

    report = run_passes(proto, target="portable", weights_dir=weights_dir, detail=detail, quantize=quantize)
    return report.model, report.counts, report.reasons
