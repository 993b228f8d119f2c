"""Weight-only quantization, same run: mixport fp32 / int8 / int4 next to llama.cpp f32 / q8_0 / q4_0
and ONNX Runtime GenAI int4 on the mini-Mixtral (issue 12, point 4).

Every variant is made from one seeded HF folder (`write_tiny(MINI_MIXTRAL, seed=0)`: vocab 32000,
hidden 512, 4 layers, 8 experts of 1792, top-2, ~490 MB fp32) and gets the same work:

* speed: the `mixport bench` prompt (64 ids, seed 0), one warm-up, then rounds alternating between
  the variants (other jobs' load hits all alike), greedy, exactly --new-tokens each (no early stop);
  prefill tok/s = prompt / time to the first token, decode tok/s = (new - 1) / the rest; medians;
* error: logits over the same --error-len teacher-forced ids (seed 1) vs transformers'
  MixtralForCausalLM in fp32 on the same folder: max and RMS |logit error|, top-1 agreement;
* size of what is deployed (mixport: the export folder, with the fast graph built in; llama.cpp: the
  GGUF; ORT-GenAI: its folder), and for mixport the peak RSS of `mixport run` (a child process).

mixport int8 / int4 are `mixport export SRC -o OUT --quantize int8|int4 [--block-size B] [--zero-points]
[--quantize-lm-head]` (a CLI without --quantize: their rows say so). A mixport variant that `mixport run`
opens on the portable model.onnx (no fast graph for it) is measured but not timed (--time-portable).
A peer that cannot run (not installed, a failed conversion) prints why, and the table says so. The
table ends with the ratios and issue 12's targets, each met / not met / n/a, or "unsure" for a speed
target on a loaded machine (llama.cpp's spinning threads collapse when other jobs share the cores).

Peers: pip install onnxruntime-genai; llama-cpp-python built from its sdist (see quant_peers.py).

Usage: PYTHONPATH=. python tools/bench_quant.py [--work DIR] [--threads 2] [--rounds 5]
       [--prompt-len 64] [--new-tokens 128] [--error-len 128] [--block-size B] [--zero-points]
       [--quantize-lm-head] [--time-portable]
       [--variants mixport-fp32,llama-q8_0,...] [--llama-src DIR] [--ortgenai-option KEY=VALUE ...]
       [--json] [--tiny]
(--work keeps the source folder, exports, GGUFs and logs, reused on the next run;
 --tiny: tiny configs, the script's logic in seconds.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: the benchmark's modules

import quant_table as qt  # noqa: E402
from quant_common import Plan, Prepared, interleaved, speeds  # noqa: E402

VARIANTS = {"mixport-fp32": qt.MIXPORT_FP32, "mixport-int8": qt.MIXPORT_INT8, "mixport-int4": qt.MIXPORT_INT4,
            "llama-f32": qt.LLAMA_F32, "llama-q8_0": qt.LLAMA_Q8, "llama-q4_0": qt.LLAMA_Q4,
            "ortgenai-int4": qt.ORTGENAI_INT4}
LOADED = 0.5  # 1-minute load average at the start above which the run is flagged as shared
TINY_SIZES = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "head_dim": 16, "intermediate_size": 32,
              "num_local_experts": 4, "num_experts_per_tok": 2}


def variant_list(text: str) -> list[str]:
    """--variants: comma-separated keys of VARIANTS ("all" for every one), in table order."""
    keys = list(VARIANTS) if text.strip() == "all" else [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown or text!r}; choose from {', '.join(VARIANTS)}")
    return [k for k in VARIANTS if k in keys]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="Folder for the model, exports, GGUFs (reused).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--error-len", type=int, default=128, help="Teacher-forced ids the errors are taken over.")
    ap.add_argument("--block-size", type=int, default=None, help="mixport export --block-size (default: its own).")
    ap.add_argument("--zero-points", action="store_true", help="mixport int4 with mixport export --zero-points.")
    ap.add_argument("--quantize-lm-head", action="store_true", help="mixport int8/int4 with --quantize-lm-head.")
    ap.add_argument("--variants", type=variant_list, default=list(VARIANTS), help="Comma-separated; default all.")
    ap.add_argument("--time-portable", action="store_true",
                    help="Time a mixport variant on model.onnx too when the fast graph cannot be built (slow).")
    ap.add_argument("--llama-src", type=Path, default=None,
                    help="llama.cpp tree with convert_hf_to_gguf.py (default: llama-cpp-python's sdist, fetched).")
    ap.add_argument("--ortgenai-option", action="append", default=[], metavar="KEY=VALUE",
                    help="ORT-GenAI builder extra option (repeatable), e.g. accuracy_level=1; default: its defaults.")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="Tiny config (a smoke run of this script).")
    args = ap.parse_args(argv)
    for name in ("threads", "rounds", "prompt_len", "error_len"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.new_tokens < 2:
        ap.error(f"--new-tokens must be >= 2 (one prefill token, then decode steps), got {args.new_tokens}")
    bad = [o for o in args.ortgenai_option if "=" not in o]
    if bad:
        ap.error(f"--ortgenai-option takes KEY=VALUE, got {bad}")
    if args.block_size is not None and args.block_size < 1:
        ap.error(f"--block-size must be >= 1, got {args.block_size}")
    return args


def export_flags(args: argparse.Namespace, quantize: str | None) -> list[str]:
    """The `mixport export` options besides --quantize for one precision (none for fp32)."""
    if quantize is None:
        return []
    flags = ["--block-size", str(args.block_size)] if args.block_size else []
    flags += ["--zero-points"] if args.zero_points and quantize == "int4" else []
    return flags + (["--quantize-lm-head"] if args.quantize_lm_head else [])


def source_folder(work: Path, tiny: bool):  # -> (Path, MoEConfig)
    """The seeded HF folder every variant is made from (written once into WORK)."""
    from mixport.exporter.tiny import MINI_MIXTRAL, write_tiny

    cfg = replace(MINI_MIXTRAL, **TINY_SIZES) if tiny else MINI_MIXTRAL
    src = work / ("tiny-src" if tiny else "mini-src")
    if not (src / "config.json").is_file():
        write_tiny(src, cfg, seed=0)
    return src, cfg


def runners(args: argparse.Namespace, src: Path, work: Path, plan: Plan, ref) -> dict[str, Callable]:  # noqa: ANN001
    """Per chosen variant, a call that makes and opens it: () -> (Row, Prepared | None)."""
    import quant_mixport as mx
    import quant_peers as peers

    def mix(name: str, quantize: str | None) -> Callable:
        return lambda: mx.mixport_variant(name, src, work, plan, ref, quantize, export_flags(args, quantize),
                                          args.time_portable)

    def llama(name: str) -> Callable:
        return lambda: peers.llama_variant(name, src, work, plan, ref, args.llama_src)

    table = {"mixport-fp32": mix(qt.MIXPORT_FP32, None), "mixport-int8": mix(qt.MIXPORT_INT8, "int8"),
             "mixport-int4": mix(qt.MIXPORT_INT4, "int4"), "llama-f32": llama(qt.LLAMA_F32),
             "llama-q8_0": llama(qt.LLAMA_Q8), "llama-q4_0": llama(qt.LLAMA_Q4),
             "ortgenai-int4": lambda: peers.ortgenai_variant(src, work, plan, ref, args.ortgenai_option)}
    return {VARIANTS[k]: table[k] for k in args.variants}


def prepare_all(makers: dict[str, Callable]) -> tuple[dict[str, qt.Row], dict[str, Prepared]]:
    """Make every variant; one that raises becomes a row saying why (the others go on)."""
    rows: dict[str, qt.Row] = {}
    ready: dict[str, Prepared] = {}
    for name, make in makers.items():
        print(f"# preparing {name}", file=sys.stderr, flush=True)
        try:
            row, prepared = make()
        except Exception as exc:  # noqa: BLE001 - a peer's failure is a row, not the end of the run
            row, prepared = qt.Row(name, why=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"), None
        rows[name] = row
        if prepared is not None:
            ready[name] = prepared
    return rows, ready


def run_header(args: argparse.Namespace, src: Path, plan: Plan, load0: float, load1: float) -> tuple[str, bool]:
    """The table's first line(s), and whether other jobs shared the cores (load avg at the start, or at
    the end beyond this run's own threads, above LOADED)."""
    header = (f"mini-Mixtral{' [--tiny]' if args.tiny else ''} ({src}), prompt {plan.prompt_len}, "
              f"{plan.new_tokens} new tokens, errors over {plan.error_len} teacher-forced ids vs transformers fp32, "
              f"{plan.threads} threads, median of {args.rounds} alternating rounds "
              f"(load avg {load0:.1f} -> {load1:.1f})")
    loaded = max(load0, load1 - plan.threads) > LOADED
    if loaded:
        header += ("\nWARNING: other jobs shared these cores (load avg above). llama.cpp's threads spin at every op's "
                   "barrier, so its decode collapses under such load (seen on 2 cores: q8_0 400 -> 4-23 tok/s) "
                   "while ONNX Runtime's degrades gently: the speed targets read 'unsure'; compare on a quiet machine.")
    return header, loaded


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="mixport-bench-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    src, cfg = source_folder(work, args.tiny)
    plan = Plan(cfg.vocab_size, args.prompt_len, args.new_tokens, args.error_len, args.threads)
    if max(plan.prompt_len + plan.new_tokens, plan.error_len) > cfg.max_position_embeddings:
        raise SystemExit(f"prompt + new tokens / error ids exceed the model's {cfg.max_position_embeddings} positions")
    load0 = os.getloadavg()[0]
    from quant_mixport import reference_logits

    ref = reference_logits(src, plan)
    rows, ready = prepare_all(runners(args, src, work, plan, ref))
    timers = {n: p.timer for n, p in ready.items() if p.timer is not None}
    print(f"# timing {len(timers)} variants, {args.rounds} rounds", file=sys.stderr, flush=True)
    for name, times in interleaved(timers, args.rounds).items():
        got = speeds(times, plan)
        rows[name].decode_tok_s, rows[name].prefill_tok_s = got["decode_tok_s"], got["prefill_tok_s"]
    header, loaded = run_header(args, src, plan, load0, os.getloadavg()[0])
    print(qt.format_report(rows, header, loaded))
    if args.json:
        print(json.dumps({"rows": {n: r.to_dict() for n, r in rows.items()},
                          "loaded": loaded,
                          "targets": [v.__dict__ for v in qt.judge_all(rows, loaded=loaded)]}, indent=2))
    for prepared in ready.values():
        prepared.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
