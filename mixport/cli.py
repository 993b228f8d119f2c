"""The ``mixport`` command line: one click group; commands parse and call the library."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mixport.errors import MixportError


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """MixportError -> one line on stderr and its exit code (1, or 3 for parity)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MixportError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


def _progress(msg: str) -> None:
    click.echo(f"[mixport] {msg}...", err=True)


@click.group()
@click.version_option(package_name="mixport")
def main() -> None:
    """mixport: Mixture-of-Experts models to portable ONNX, fused sparse ops and TensorRT."""


@main.command()
@click.argument("model_dir", required=False, type=click.Path(path_type=Path))
@click.option("--model", "builtin", help="A built-in model instead of MODEL_DIR (tiny).")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder (must not exist unless --force).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--no-fuse", is_flag=True, help="Keep the per-expert FFNs (skip the fusion passes).")
@click.option("--no-check", is_flag=True, help="Skip the quick parity check at the end.")
@click.option("-v", "--verbose", is_flag=True, help="Print what each pass rewrote.")
@click.option("--engine", is_flag=True, help="Also build OUT_DIR/model.engine (as `mixport build`).")
@click.option("--targets", default=None, help="With --engine: GPUs to build for (see `mixport build`).")
@friendly
def export(model_dir: Path | None, builtin: str | None, out_dir: Path, dtype: str, force: bool,
           no_fuse: bool, no_check: bool, verbose: bool, engine: bool, targets: str | None) -> None:
    """Export a Mixtral folder (or --model tiny) to ONNX with mixport routing/MoE ops.

    Example: mixport export --model tiny -o out --engine
    """
    from mixport.exporter.export import export as run_export
    from mixport.progress import StepBar

    with StepBar(total=3 if no_fuse else 4, desc="export") as bar:
        result = run_export(model_dir, out_dir, builtin=builtin, dtype=dtype, force=force, fuse=not no_fuse,
                            progress=bar)
    if verbose and result.pass_counts:
        for name, count in result.pass_counts.items():
            click.echo(f"  pass {name}: {count} rewrites", err=True)
    click.echo(f"exported {result.out_dir} ({', '.join(result.files)})")
    if engine:
        from mixport.build.folder import BuildRequest, build_folder

        built = build_folder(result.out_dir, BuildRequest(targets=targets), progress=_progress)
        click.echo(built.message)
    if not no_check:
        from mixport.tools.check import CheckUnavailable

        try:
            _check_and_report(result.out_dir, steps=4)
        except CheckUnavailable as exc:
            click.echo(f"[mixport] parity check skipped: {exc}", err=True)


def _check_and_report(folder: Path, steps: int, prefer_transformers: bool = True) -> None:
    from mixport.errors import ParityError
    from mixport.tools.check import format_report, run_check

    _progress("checking parity (PyTorch vs ONNX Runtime)")
    report = run_check(folder, steps=steps, prefer_transformers=prefer_transformers)
    for note in report.notes:
        click.echo(f"[mixport] {note}", err=True)
    click.echo(format_report(report))
    if not report.passed:
        raise ParityError("parity check failed", given=folder, expected="every output within tolerance",
                          hint="see the table above")


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--targets", default=None,
              help="GPUs: 'ampere+' (RTX default), 'sm80,sm86,...' (TensorRT-RTX), 'current' (full TensorRT default).")
@click.option("--dtype", default=None, help="Expected precision (fp32 | fp16 | bf16); must match the export.")
@click.option("--batch", default=None, metavar="MIN:OPT:MAX", help="Batch range [default: 1:1:4].")
@click.option("--seq", default=None, metavar="MIN:OPT:MAX", help="New tokens per step [default: 1:64:256].")
@click.option("--past", default=None, metavar="MIN:OPT:MAX", help="Cached tokens [default: 0:256:context-1].")
@click.option("--no-plugins", is_flag=True, help="Inline the mixport nodes' ONNX bodies (no plugin layers).")
@click.option("--force", is_flag=True, help="Rebuild even if an engine exists (stale or built otherwise).")
@friendly
def build(out_dir: Path, targets: str | None, dtype: str | None, batch: str | None, seq: str | None,
          past: str | None, no_plugins: bool, force: bool) -> None:
    """Build OUT_DIR/model.engine with the mixport TensorRT plugins and record it in the manifest.

    Example: mixport build out --targets sm80,sm86 --batch 1:1:8
    """
    from mixport.build.folder import BuildRequest, build_folder, parse_range

    ranges = {name: parse_range(text, name) if text else None
              for name, text in (("batch", batch), ("seq", seq), ("past", past))}
    request = BuildRequest(targets=targets, dtype=dtype, use_plugins=not no_plugins, force=force, **ranges)
    result = build_folder(out_dir, request, progress=_progress)
    click.echo(result.message)


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--steps", default=8, show_default=True, help="Decode steps after the prefill.")
@click.option("--reference", type=click.Choice(["auto", "mixport"]), default="auto", show_default=True,
              help="auto: transformers when installed, else mixport's reference model.")
@friendly
def check(folder: Path, steps: int, reference: str) -> None:
    """Prove parity: PyTorch vs ONNX Runtime, per output and per layer's expert choice.

    Example: mixport check out --steps 16
    """
    _check_and_report(folder, steps, prefer_transformers=reference == "auto")


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeat for a batch).")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto",
              show_default=True, help="auto: TensorRT when model.engine is up to date and a GPU is visible.")
@friendly
def run(folder: Path, prompts: tuple[str, ...], max_new_tokens: int, device: str,
        threads: int | None, backend: str) -> None:
    """Generate text from an export folder (greedy, KV cache).

    Example: mixport run out --prompt "The ship sailed" --max-new-tokens 24
    """
    from mixport.runtime import load

    if not prompts:
        raise click.UsageError("give at least one --prompt")
    pipe = load(folder, device=device, threads=threads, backend=backend)
    where = "cuda" if pipe.session.backend == "tensorrt" else device
    click.echo(f"[mixport] backend: {pipe.session.backend} ({where}); {pipe.backend_reason}", err=True)
    ids = [_prompt_ids(pipe, p) for p in prompts]
    out = pipe.generate_ids(ids, max_new_tokens)
    for p, o in zip(prompts, out, strict=True):
        click.echo(p + pipe.decode(o) if pipe.tokenizer else pipe.decode(o))


@main.command()
@click.argument("src", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("-o", "--output", "dst", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Where to write the optimized model.")
@click.option("--target", type=click.Choice(["portable", "trt-noplugin", "ort"]), default="portable",
              show_default=True, help="MoE body: sparse (portable), dense (TensorRT without plugin), "
              "or ONNX Runtime's com.microsoft.MoE (ort).")
@click.option("-v", "--verbose", is_flag=True, help="Print each pass's rewrites and why passes did not match.")
@friendly
def optimize(src: Path, dst: Path, target: str, verbose: bool) -> None:
    """Fuse an unfused export's experts into mixport MoE nodes and fold constants.

    Example: mixport optimize out/model.onnx -o fused.onnx --target trt-noplugin -v
    """
    from mixport.passes import optimize_file

    report = optimize_file(src, dst, target)
    if verbose:
        click.echo("\n".join(report.lines()), err=True)
    click.echo(f"optimized {dst} (target {target})")


def _prompt_ids(pipe: Any, prompt: str) -> list[int]:
    if pipe.tokenizer is not None:
        return pipe.encode(prompt)
    try:
        return [int(t) for t in prompt.split()]
    except ValueError:
        return pipe.encode(prompt)  # raises the clear "no tokenizer" error


if __name__ == "__main__":
    main()
