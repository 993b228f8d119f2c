"""The quantization benchmark's mixport side: the transformers fp32 reference logits, and mixport
fp32 / int8 / int4 exports (`mixport export [--quantize int8|int4] [--block-size B]`) run on the
graph `mixport run` picks (the fast ONNX Runtime graph), timed with `mixport bench`'s calls."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from quant_common import Plan, Prepared, logit_errors, run_child, size_mb, tail
from quant_table import Row

# The mixport CLI in a child that writes its own peak RSS (VmHWM, kB) to $MIXPORT_BENCH_HWM at exit: wait4's
# ru_maxrss would count the parent's RSS (a vfork'd child's high-water mark starts from the parent's memory).
CLI = [sys.executable, "-c", """
import atexit, os, sys
def _hwm():
    hwm = [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
    open(os.environ["MIXPORT_BENCH_HWM"], "w").write(hwm[0] if hwm else "")
atexit.register(_hwm)
from mixport.cli import main
sys.exit(main())
"""]
RUN_PROMPT = "The ship sailed north, the wind was cold, and the sailors sang"
PORTABLE_RUN_TOKENS = 8
NO_QUANTIZE = ("mixport export has no --quantize option yet (issue 12: the lead's quantized export); "
               "this row runs once it lands")


def run_cli(args: list[str], log: Path) -> tuple[int, float | None]:
    """`mixport ARGS` in a child, output to LOG: (exit code, its own peak RSS MB or None)."""
    hwm = log.with_suffix(".hwm")
    hwm.unlink(missing_ok=True)
    code = run_child([*CLI, *args], log, env={"MIXPORT_BENCH_HWM": str(hwm)})
    text = hwm.read_text().strip() if hwm.is_file() else ""
    return code, (int(text) / 1024 if text.isdigit() else None)


def reference_logits(src: Path, plan: Plan) -> np.ndarray:
    """transformers' MixtralForCausalLM (fp32) on ``plan.error_tokens``: logits [L, V]."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(plan.threads)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model(torch.tensor([plan.error_tokens]), use_cache=False).logits[0].float().numpy()
    del model
    return out


def export(src: Path, out: Path, quantize: str | None, flags: list[str]) -> tuple[str, float | None]:
    """`mixport export [--quantize Q FLAGS]` in a child (reused when OUT already holds one):
    ("" or why not, export peak RSS MB or None when reused)."""
    if (out / "manifest.json").is_file():
        return "", None
    cmd = ["export", str(src), "-o", str(out), "--force", "--no-check"]
    if quantize:
        cmd += ["--quantize", quantize, *flags]
    log = out.parent / f"{out.name}.export.log"
    code, peak = run_cli(cmd, log)
    if code == 0:
        return "", peak
    text = log.read_text(errors="replace")
    if quantize and code == 2 and "No such option: --quantize" in text:
        return NO_QUANTIZE, None
    return f"mixport export exited {code}: {tail(log)}", None


def run_peak_rss(folder: Path, plan: Plan, tokens: int) -> tuple[float | None, str]:
    """Peak RSS (MB) of `mixport run FOLDER` generating TOKENS tokens, in a child."""
    log = folder.parent / f"{folder.name}.run.log"
    code, peak = run_cli(["run", str(folder), "--prompt", RUN_PROMPT, "--max-new-tokens", str(tokens),
                          "--threads", str(plan.threads), "--no-stream"], log)
    return (peak, "") if code == 0 else (None, f"mixport run exited {code}: {tail(log)}")


def _teacher_forced(session: object, tokens: list[int]) -> np.ndarray:
    ids = np.array([tokens], dtype=np.int64)
    session.reset(1)  # type: ignore[attr-defined]
    logits = session.step(ids, np.ones_like(ids), np.arange(ids.shape[1], dtype=np.int64)[None])  # type: ignore[attr-defined]
    return np.asarray(logits[0], dtype=np.float32)


def prepare(name: str, folder: Path, plan: Plan, ref: np.ndarray, time_portable: bool) -> tuple[Row, Prepared]:
    """Open FOLDER as `mixport run` does; its row (errors, size, run RSS) and its timer. On the portable
    model.onnx (the fast graph could not be built) it is not timed unless TIME_PORTABLE: the benchmark
    is of the fast graph, and a quantized portable graph dequantizes every weight at every step."""
    from mixport.runtime import load
    from mixport.runtime.ort_graph import FILE as FAST_FILE
    from mixport.tools.bench import graph_reason, time_once

    said: list[str] = []  # load's progress lines: why the fast graph was not used, when it was not
    pipe = load(folder, threads=plan.threads, graph="auto", backend="onnxruntime", progress=said.append)
    fast_mb = sum(size_mb(f) for f in folder.iterdir() if f.name.startswith(FAST_FILE))
    row = Row(name, size_mb=size_mb(folder) - fast_mb)  # what `mixport export` wrote
    onnx_mb = sum(size_mb(f) for f in folder.glob("model.onnx*"))
    row.notes.append(f"ran: {pipe.graph} graph; export {row.size_mb:.1f} MB (model.onnx* {onnx_mb:.1f} MB)"
                     + (f", + {fast_mb:.1f} MB fast graph built into the folder" if fast_mb else ""))
    if pipe.graph != "fast":
        row.notes += [ln for ln in said if "fast graph" in ln][-1:] or [
            graph_reason(pipe.config, pipe.manifest.dtype, pipe.backend, pipe.graph, "auto")]
    logits = _teacher_forced(pipe.session, plan.error_tokens)
    row.set_errors(logit_errors(ref, logits))
    timed = pipe.graph == "fast" or time_portable
    row.peak_rss_mb, why = run_peak_rss(folder, plan, plan.new_tokens if timed else PORTABLE_RUN_TOKENS)
    row.notes += [why] if why else [] if timed else [
        f"not timed: portable graph (--time-portable times it); run RSS over {PORTABLE_RUN_TOKENS} tokens"]
    if not timed:
        return row, Prepared(None, logits, pipe.close)
    time_once(pipe.session, [plan.prompt], min(plan.new_tokens, 4))  # warm-up
    return row, Prepared(lambda: time_once(pipe.session, [plan.prompt], plan.new_tokens), logits, pipe.close)


def mixport_variant(name: str, src: Path, work: Path, plan: Plan, ref: np.ndarray, quantize: str | None,
                    flags: list[str], time_portable: bool = False) -> tuple[Row, Prepared | None]:
    """Export (or reuse) and open one mixport variant (FLAGS: more `mixport export` options with
    --quantize, e.g. --block-size 64); a variant that cannot run says why."""
    flags = flags if quantize else []
    out = work / "-".join([name.replace(" ", "-"), *(f.lstrip("-") for f in flags)])
    why, peak = export(src, out, quantize, flags)
    if why:
        print(f"# {name}: {why}", file=sys.stderr)
        return Row(name, why=why), None
    try:
        row, prepared = prepare(name, out, plan, ref, time_portable)
    except Exception as exc:  # noqa: BLE001 - a variant that fails to run is reported, not fatal
        print(f"# {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return Row(name, why=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"), None
    if peak is not None:
        row.notes.append(f"export peak RSS {peak:.0f} MB")
    if flags:
        row.notes.append(f"exported with --quantize {quantize} {' '.join(flags)}")
    return row, prepared
