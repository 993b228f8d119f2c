"""The ``mixport`` command line: one click group; commands parse and call the library."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from mixport import progress
from mixport.errors import FileSystemError, MixportError, Terminated

INTERRUPTED, TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """MixportError -> one line on stderr and its exit code (1, or 3 for parity); OSError -> one line, 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MixportError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:  # disk full, permission denied: still one line, exit 1
            click.echo(f"error: {FileSystemError.from_os_error(exc)}", err=True)
            sys.exit(1)

    return wrapper


def _progress(msg: str) -> None:
    click.echo(f"[mixport] {msg}...", err=True)


class RangeType(click.ParamType):
    """MIN:OPT:MAX (or N for N:N:N) -> (min, opt, max); anything else is a usage error (exit 2)."""

    name = "MIN:OPT:MAX"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        from mixport.engine.folder import RANGE_FORM, range_of

        parsed = range_of(str(value))
        if parsed is None:
            self.fail(f"{value!r} is not {RANGE_FORM} (e.g. 1:1:4)", param, ctx)
        return parsed


RANGE = RangeType()


class FiniteFloat(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (a nan passes every range comparison)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class NonEmptyText(click.ParamType):
    """A non-empty string (an empty --stop would match everywhere and end every row at once)."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str) or not value:
            self.fail("an empty string is not allowed.", param, ctx)
        return value


class ThreadCount(click.ParamType):
    """1 to 4 threads per CPU this process may run on (more only exhausts the machine)."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from mixport.runtime.ort_session import max_threads

        return click.IntRange(1, max_threads()).convert(value, param, ctx)


THREADS = ThreadCount()
DTYPES = ("fp32", "fp16", "bf16")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM raises ``Terminated`` (a KeyboardInterrupt) as Ctrl-C would, so
    the same cleanup runs (staging folders, temp files); a second SIGTERM during it is ignored. Both
    signals are latched (``progress.latch``): one a library swallows is raised again at the job's next
    progress step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(_signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        exc = Terminated()
        progress.latch(exc)
        raise exc

    def interrupt(_signum: int, _frame: Any) -> None:
        exc = KeyboardInterrupt()
        progress.latch(exc)
        raise exc

    old = signal.signal(signal.SIGTERM, handle)
    old_int = signal.signal(signal.SIGINT, interrupt) if signal.getsignal(signal.SIGINT) is signal.default_int_handler \
        else None  # an ignored SIGINT (a background job) stays ignored
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        if old_int is not None:
            signal.signal(signal.SIGINT, old_int)


class _Group(click.Group):
    """The ``mixport`` group: Ctrl-C exits 130 and SIGTERM 143, each with one line on stderr, after
    the command's own cleanup ran (click's default is "Aborted!" and exit 1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with _sigterm_as_interrupt():
                return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            terminated = isinstance(exc, Terminated)
            click.echo(f"[mixport] {'terminated' if terminated else 'interrupted'}", err=True)
            sys.exit(TERMINATED if terminated else INTERRUPTED)
        finally:
            progress.clear_latch()


@click.group(cls=_Group)
@click.version_option(package_name="mixport")
def main() -> None:
    """mixport: Mixture-of-Experts models to portable ONNX, fused sparse ops and TensorRT."""


def _quantize_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--quantize / --block-size / --zero-points / --quantize-lm-head (export and optimize)."""
    from mixport import quant

    options = [
        click.option("--quantize", "precision", type=click.Choice(quant.PRECISIONS), default=None,
                     help="Weight-only block quantization of experts and attention (router and norms stay float)."),
        click.option("--block-size", type=click.Choice([str(b) for b in quant.BLOCK_SIZES]),
                     default=str(quant.DEFAULT_BLOCK_SIZE), show_default=True,
                     help="With --quantize: weights per scale, along the input axis."),
        click.option("--zero-points", is_flag=True, help="With --quantize int4: uint4 with zero points "
                     "(asymmetric) instead of symmetric int4."),
        click.option("--quantize-lm-head", is_flag=True, help="With --quantize: quantize lm_head too."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _quant_request(precision: str | None, block_size: str, zero_points: bool, lm_head: bool) -> Any:
    """QuantOptions from the CLI's words; None without --quantize (then the other three must be unset)."""
    from mixport import quant
    from mixport.errors import ConfigError
    if precision is None:
        if zero_points or lm_head:
            raise ConfigError("quantization options without --quantize",
                              given="--zero-points" if zero_points else "--quantize-lm-head",
                              expected="--quantize int8|int4 with them", hint="add --quantize int4")
        return None
    return quant.QuantOptions(quant.Scheme.parse(precision, int(block_size), zero_points), lm_head)


@main.command()
@click.argument("model_dir", required=False, type=click.Path(path_type=Path))
@click.option("--model", "builtin", help="A built-in model instead of MODEL_DIR (tiny).")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder (must not exist unless --force).")
@click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--no-fuse", is_flag=True, help="Keep the per-expert FFNs (skip the fusion passes).")
@click.option("--no-check", is_flag=True, help="Skip the quick parity check at the end.")
@click.option("-v", "--verbose", is_flag=True, help="Print each pass's rewrites and why passes did not match.")
@click.option("--engine", is_flag=True, help="Also build OUT_DIR/model.engine (as `mixport build`).")
@click.option("--targets", default=None, help="With --engine: GPUs to build for (see `mixport build`).")
@_quantize_options
@friendly
def export(model_dir: Path | None, builtin: str | None, out_dir: Path, dtype: str, force: bool,
           no_fuse: bool, no_check: bool, verbose: bool, engine: bool, targets: str | None,
           precision: str | None, block_size: str, zero_points: bool, quantize_lm_head: bool) -> None:
    """Export a Mixtral folder (or --model tiny) to ONNX with mixport routing/MoE ops.

    Example: mixport export --model tiny -o out --engine
    """
    from mixport.exporter.export import check_request
    from mixport.exporter.export import export as run_export
    from mixport.progress import StepBar

    quantize = _quant_request(precision, block_size, zero_points, quantize_lm_head)
    check_request(model_dir, out_dir, builtin=builtin, force=force, fuse=not no_fuse,
                  quantize=quantize)  # in a second, before torch loads
    with StepBar(total=3 if no_fuse else 4, desc="export") as bar:
        result = run_export(model_dir, out_dir, builtin=builtin, dtype=dtype, force=force, fuse=not no_fuse,
                            progress=bar, detail=bar.detail, notice=bar.note, quantize=quantize)
    if verbose and result.pass_counts:
        from mixport.passes import report_lines

        click.echo("\n".join(report_lines(result.pass_counts, result.pass_reasons)), err=True)
    click.echo(f"exported {result.out_dir} ({', '.join(result.files)})")
    if engine:
        from mixport.engine.folder import BuildRequest, build_folder

        built = build_folder(result.out_dir, BuildRequest(targets=targets), progress=_progress)
        click.echo(built.message)
    if not no_check:
        from mixport.errors import CheckUnavailable

        try:
            _check_and_report(result.out_dir, steps=4)
        except CheckUnavailable as exc:
            click.echo(f"[mixport] parity check skipped: {exc}", err=True)


def _check_and_report(folder: Path, steps: int, prefer_transformers: bool = True, onnx_path: Path | None = None,
                      verbose: bool = False, text: Path | None = None, dequantized: bool = False) -> None:
    from mixport.errors import ParityError
    from mixport.tools.check import format_report, run_check
    from mixport.tools.check_quant import is_quantized

    if text is not None and dequantized:
        from mixport.errors import ConfigError

        raise ConfigError("--text and --reference dequantized measure different things", given="both",
                          expected="one of them", hint="--text: perplexity vs the fp32 source; "
                          "--reference dequantized: model.onnx's exactness")
    if text is not None or (not dequantized and is_quantized(folder)):
        _quant_check_and_report(folder, steps, prefer_transformers, onnx_path, text)
        return
    _progress("checking parity (PyTorch vs ONNX Runtime)")
    report = run_check(folder, steps=steps, prefer_transformers=prefer_transformers, onnx_path=onnx_path,
                       verbose=verbose, dequantized=dequantized)
    for note in report.notes:
        click.echo(f"[mixport] {note}", err=True)
    click.echo(format_report(report))
    if not report.passed:
        raise ParityError(f"parity check failed: {', '.join(report.failures())} differ",
                          given=onnx_path or folder, expected="every output within tolerance and the same experts "
                          "picked per layer", hint="see the table above")


def _quant_check_and_report(folder: Path, steps: int, prefer_transformers: bool, onnx_path: Path | None,
                            text: Path | None) -> None:
    from mixport.errors import ParityError
    from mixport.tools.check_quant import format_quant_report, run_quant_check

    _progress("measuring the quantization error (fp32 PyTorch vs the quantized model)")
    report = run_quant_check(folder, steps=steps, prefer_transformers=prefer_transformers, onnx_path=onnx_path,
                             text=text)
    for note in report.notes:
        click.echo(f"[mixport] {note}", err=True)
    click.echo(format_quant_report(report))
    if not report.passed:
        raise ParityError(f"quantization error beyond the {report.scheme} limits: {', '.join(report.failures())}",
                          given=onnx_path or folder, expected="every measure within its limit (the table's "
                          "limit column)", hint="see the table above")


class _ClickStderr(logging.Handler):
    """Log records on (click's) stderr: Polygraphy's lines as they are, others as [logger] level: text."""

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if not record.name.startswith("Polygraphy"):
            text = f"[{record.name}] {record.levelname.lower()}: {text}"
        click.echo(text, err=True)


@contextlib.contextmanager
def _library_logs(verbose: bool) -> Iterator[None]:
    """-v: other libraries' messages (TensorRT's, through the mixport.engine logger; Polygraphy's)
    on stderr. Without -v they stay out of the output (the mixport loggers have no handler of theirs
    then, and TensorRT's errors reach the user inside mixport's own one-line error)."""
    if not verbose:
        yield
        return
    handler = _ClickStderr()
    loggers = [logging.getLogger(name) for name in ("mixport", "Polygraphy")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--targets", default=None,
              help="GPUs: 'ampere+' (RTX default), 'sm80,sm86,...' (TensorRT-RTX), 'current' (full TensorRT default).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Expected precision; must match the export's.")
@click.option("--batch", type=RANGE, default=None, help="Batch range [default: 1:1:4].")
@click.option("--seq", type=RANGE, default=None, help="New tokens per step [default: 1:64:256].")
@click.option("--past", type=RANGE, default=None, help="Cached tokens [default: 0:256:context-1].")
@click.option("--no-plugins", is_flag=True, help="Inline the mixport nodes' ONNX bodies (no plugin layers).")
@click.option("--force", is_flag=True, help="Rebuild even if an engine exists (stale or built otherwise).")
@click.option("-v", "--verbose", is_flag=True, help="Show TensorRT's warnings and messages (on stderr).")
@friendly
def build(out_dir: Path, targets: str | None, dtype: str | None, batch: tuple[int, int, int] | None,
          seq: tuple[int, int, int] | None, past: tuple[int, int, int] | None, no_plugins: bool,
          force: bool, verbose: bool) -> None:
    """Build OUT_DIR/model.engine with the mixport TensorRT plugins and record it in the manifest.

    Example: mixport build out --targets sm80,sm86 --batch 1:1:8
    """
    from mixport.engine.folder import BuildRequest, build_folder

    request = BuildRequest(targets=targets, dtype=dtype, batch=batch, seq=seq, past=past,
                           use_plugins=not no_plugins, force=force)
    with _library_logs(verbose):
        result = build_folder(out_dir, request, progress=_progress)
    click.echo(result.message)


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--steps", type=click.IntRange(min=0), default=8, show_default=True,
              help="Decode steps after the prefill (the prompt is 12 tokens; both within the model's context).")
@click.option("--reference", type=click.Choice(["auto", "mixport", "dequantized"]), default="auto",
              show_default=True, help="auto: transformers when installed, else mixport's reference model. "
              "dequantized (quantized folders): mixport's on the source weights quantized -> dequantized as the "
              "export does, held to the fp32 tolerances.")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Compare this ONNX file (same inputs and outputs) instead of FOLDER/model.onnx.")
@click.option("--text", type=click.Path(path_type=Path), default=None,
              help="Quantized folders: also the perplexity of the reference and of the quantized model on this "
              "UTF-8 text (cut at the model's context).")
@click.option("-v", "--verbose", is_flag=True, help="Show Polygraphy's and TensorRT's log lines (on stderr).")
@friendly
def check(folder: Path, steps: int, reference: str, onnx_path: Path | None, text: Path | None,
          verbose: bool) -> None:
    """Prove parity: PyTorch (FOLDER's source model) vs ONNX Runtime, per output and per layer's expert choice.

    Compares FOLDER/model.onnx as it is now (a note says when it changed since export), or --onnx FILE.
    A quantized folder is measured against its fp32 source: logit error, top-1, greedy and expert
    agreement (and perplexity with --text), held to the limits of its precision.

    Example: mixport check out --steps 16
    """
    with _library_logs(verbose):
        _check_and_report(folder, steps, prefer_transformers=reference == "auto", onnx_path=onnx_path,
                          verbose=verbose, text=text, dequantized=reference == "dequantized")



@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeat for a batch).")
@click.option("--prompts-file", type=click.Path(path_type=Path), help="UTF-8 file, one prompt per line.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--temperature", type=FiniteFloat(min=0), default=0.0, show_default=True,
              help="0: greedy; > 0: sample.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sample from the k likeliest (0: off; needs --temperature).")
@click.option("--top-p", type=FiniteFloat(0, 1, min_open=True), default=1.0, show_default=True,
              help="Nucleus sampling mass (1: off; needs --temperature).")
@click.option("--repetition-penalty", type=FiniteFloat(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=None,
              help="Seed for sampling (needs --temperature).")
@click.option("--stop", type=NonEmptyText(), multiple=True,
              help="Stop a row when its text contains this (repeatable).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@click.option("--stream/--no-stream", default=True, show_default=True, help="Print tokens as produced.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=THREADS, default=None, help="ONNX Runtime intra-op threads (up to 4 per CPU).")
@click.option("--graph", type=click.Choice(["auto", "fast", "portable"]), default="auto", show_default=True,
              help="fast: ONNX Runtime CPU graph (built once into FOLDER); portable: model.onnx.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto",
              show_default=True, help="auto: TensorRT when model.engine is up to date and a GPU is visible.")
@friendly
def run(folder: Path, prompts: tuple[str, ...], prompts_file: Path | None, max_new_tokens: int,
        temperature: float, top_k: int, top_p: float, repetition_penalty: float, seed: int | None,
        stop: tuple[str, ...], chat: bool, stream: bool, device: str, threads: int | None, graph: str,
        backend: str) -> None:
    """Generate text from an export folder (greedy or sampled, KV cache, batches).

    Example: mixport run out --prompt "The ship sailed" --max-new-tokens 24
    """
    from mixport.runtime import SamplingConfig
    from mixport.runtime.prompts import collect

    if not prompts and prompts_file is None:
        raise click.UsageError("give at least one --prompt or a --prompts-file")
    _sampling_needs_temperature(temperature, top_k, top_p, seed)
    _run(folder, collect(prompts, prompts_file), max_new_tokens,  # Ctrl-C while loading: exit 130 (_Group)
         SamplingConfig(temperature, top_k, top_p, repetition_penalty, seed), list(stop), chat, stream, device,
         threads, graph, backend)


def _sampling_needs_temperature(temperature: float, top_k: int, top_p: float, seed: int | None) -> None:
    """--top-k, --top-p and --seed shape sampling: without --temperature > 0 (greedy) they are refused,
    never silently ignored."""
    unused = [f"{name} {value}" for name, value, off in (("--top-k", top_k, 0), ("--top-p", top_p, 1.0),
                                                          ("--seed", seed, None)) if value != off]
    if temperature == 0 and unused:
        verb = "applies" if len(unused) == 1 else "apply"
        raise click.UsageError(f"{', '.join(unused)} only {verb} when sampling: add --temperature > 0 "
                               "(e.g. --temperature 1.0), or drop it for greedy decoding")


def _run(folder: Path, texts: list[str], max_new_tokens: int, sampling: Any, stop: list[str], chat: bool,
         stream: bool, device: str, threads: int | None, graph: str, backend: str) -> None:
    from mixport.runtime import load
    from mixport.runtime.prompts import prompt_ids
    from mixport.runtime.streaming import Interrupt

    pipe = load(folder, device=device, threads=threads, graph=graph, progress=_progress, backend=backend)
    with Interrupt() as interrupt:  # from here Ctrl-C stops generation at a token boundary
        where = "cuda" if pipe.backend == "tensorrt" else f"{device}, {pipe.graph} graph"
        click.echo(f"[mixport] backend: {pipe.backend} ({where}); {pipe.backend_reason}", err=True)
        if (graph, device, pipe.backend, pipe.graph) == ("auto", "cpu", "onnxruntime", "portable"):  # why not fast
            from mixport.tools.bench import graph_reason

            click.echo(f"[mixport] {graph_reason(pipe.config, pipe.manifest.dtype, pipe.backend, 'portable', graph)}",
                       err=True)
        ids = [prompt_ids(pipe, p, chat) for p in texts]
        pipe.check(ids, max_new_tokens)
        if stream and len(texts) == 1:
            _stream_one(pipe, texts[0], ids[0], max_new_tokens, sampling, stop, interrupt)
        else:
            _run_batch(pipe, texts, ids, max_new_tokens, sampling, stop, interrupt)
    if interrupt.set:
        click.echo("[mixport] interrupted", err=True)
        sys.exit(INTERRUPTED)


def _run_batch(pipe: Any, texts: list[str], ids: list[list[int]], max_new_tokens: int, sampling: Any,
               stop: list[str], interrupt: Any) -> None:
    """Generate all rows, then print them (on Ctrl-C: the rows so far)."""
    out: list[list[int]] = [[] for _ in ids]

    def on_token(row: int, token: int) -> None:
        out[row].append(token)
        if interrupt.set:
            raise KeyboardInterrupt  # leaves the loop at a token boundary

    try:
        pipe.generate_ids(ids, max_new_tokens, sampling, stop, on_token=on_token)
    except KeyboardInterrupt as exc:
        if isinstance(exc, Terminated):
            raise
        interrupt.set = True
    _print_rows(pipe, texts, out, stop)


def _print_text(text: str, nl: bool = True) -> None:
    """Generated text to stdout: exact to a pipe or file (click must not strip ANSI codes), with
    control characters escaped on a terminal (a model's output must not drive the terminal)."""
    from mixport.runtime.streaming import terminal_text

    tty = getattr(sys.stdout, "isatty", lambda: False)()
    click.echo(terminal_text(text) if tty else text, nl=nl, color=True)


def _print_rows(pipe: Any, texts: list[str], out: list[list[int]], stop: list[str]) -> None:
    for i, (p, o) in enumerate(zip(texts, out, strict=True)):
        prefix = f"[{i}] " if len(texts) > 1 else ""
        _print_text(prefix + (p + pipe.decode(o, stop) if pipe.tokenizer else pipe.decode(o)))


def _stream_one(pipe: Any, text: str, ids: list[int], max_new_tokens: int, sampling: Any,
                stop: list[str], interrupt: Any) -> None:
    """Print the prompt, then each piece as it is produced (on Ctrl-C: stop there)."""
    from mixport.runtime.streaming import stream_ids

    if pipe.tokenizer:  # without one, only the new token ids are printed
        _print_text(text, nl=False)
    for piece in stream_ids(pipe, ids, max_new_tokens, sampling, stop):
        _print_text(piece, nl=False)
        sys.stdout.flush()
        if interrupt.set:
            break
    click.echo("")



@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests decoded together (continuous batching).")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests waiting for a batch row; past it: HTTP 429 with Retry-After.")
@click.option("--drain-timeout", type=FiniteFloat(min=0), default=30.0, show_default=True,
              help="On SIGTERM: seconds in-flight requests get to finish.")
@click.option("--threads", type=THREADS, default=None, help="ONNX Runtime intra-op threads (up to 4 per CPU).")
@click.option("--graph", type=click.Choice(["auto", "fast", "portable"]), default="auto", show_default=True,
              help="fast: ONNX Runtime CPU graph (built once into OUT); portable: model.onnx.")
@click.option("--model-name", default=None, help="The model id in /v1/models and responses [default: OUT's name].")
@friendly
def serve(out_dir: Path, host: str, port: int, max_batch: int, max_queue: int, drain_timeout: float,
          threads: int | None, graph: str, model_name: str | None) -> None:
    """Serve an export folder over an OpenAI-compatible HTTP API (continuous batching, Prometheus /metrics).

    Example: mixport serve out --port 8000 --max-batch 8
    """
    from mixport.serve import require_deps

    require_deps()
    from mixport.serve.app import ServeOptions
    from mixport.serve.server import serve_folder

    options = ServeOptions(max_batch=max_batch, max_queue=max_queue, threads=threads, graph=graph,
                           drain_timeout=drain_timeout, model_name=model_name)
    serve_folder(out_dir, options, host, port, progress=_progress)


@main.command()
@click.argument("src", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("-o", "--output", "dst", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="Where to write the optimized model.")
@click.option("--target", type=click.Choice(["portable", "trt-noplugin", "ort"]), default="portable",
              show_default=True, help="MoE body: sparse (portable), dense (TensorRT without plugin), "
              "or ONNX Runtime's com.microsoft.MoE (ort).")
@click.option("-v", "--verbose", is_flag=True, help="Print each pass's rewrites and why passes did not match.")
@_quantize_options
@friendly
def optimize(src: Path, dst: Path, target: str, verbose: bool, precision: str | None, block_size: str,
             zero_points: bool, quantize_lm_head: bool) -> None:
    """Fuse an unfused export's experts into mixport MoE nodes and fold constants (and quantize).

    Example: mixport optimize out/model.onnx -o fused.onnx --target trt-noplugin -v
    """
    from mixport.passes import optimize_file

    report = optimize_file(src, dst, target, _quant_request(precision, block_size, zero_points, quantize_lm_head))
    if verbose:
        click.echo("\n".join(report.lines()), err=True)
    click.echo(f"optimized {dst} (target {target})")




@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--prompt-len", type=click.IntRange(min=1), default=64, show_default=True,
              help="Prompt tokens (random ids).")
@click.option("--new-tokens", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens decoded per run.")
@click.option("--batch", "batches", multiple=True, type=click.IntRange(min=1), default=(1,), show_default=True,
              help="Batch size (repeat to time several).")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed runs (median; one warm-up run excluded).")
@click.option("--threads", type=THREADS, default=None, help="ONNX Runtime intra-op threads (up to 4 per CPU).")
@click.option("--graph", type=click.Choice(["auto", "fast", "portable"]), default="auto", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto",
              show_default=True, help="auto: TensorRT when model.engine is up to date and a GPU is visible.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly
def bench(folder: Path, prompt_len: int, new_tokens: int, batches: tuple[int, ...], runs: int,
          threads: int | None, graph: str, backend: str, as_json: bool) -> None:
    """Time prefill (ms) and decode (tok/s) of an export folder, as `mixport run` runs it.

    Example: mixport bench out --prompt-len 64 --new-tokens 128 --batch 1 --batch 4
    """
    from mixport.tools.bench import bench_folder, format_table, to_json

    result = bench_folder(folder, prompt_len, new_tokens, batches, runs, threads, graph, progress=_progress,
                          backend=backend)
    click.echo(to_json(result) if as_json else format_table(result))


if __name__ == "__main__":
    main()
