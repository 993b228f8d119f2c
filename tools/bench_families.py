"""`mixport bench` for the mini-Mixtral and the mini-Qwen3-MoE side by side, in one run.

Both are written with seeded weights (`write_tiny`; the Qwen3-MoE one by transformers'
Qwen3MoeForCausalLM) and exported in a fresh child process each (its time and peak RSS, VmHWM),
then loaded as `mixport run` loads them and timed with the code `mixport bench` times with
(`tools.bench.bench_session`: one warm-up, greedy, every run decodes exactly --new-tokens):
rounds alternate between the models, so other jobs' load hits both alike; medians per model.

* mini-Mixtral: vocab 32000, hidden 512, 4 layers, 8/2 heads, head_dim 64, 8 experts of 1792, top-2.
* mini-Qwen3-MoE: the same, with 32 experts of 448, top-4 (renormalized), per-head q/k RMSNorm.

Each model is timed on the graph `mixport run` picks ("auto": the line says which graph ran and,
for the portable model.onnx, why not the fast one) and on the portable model.onnx, so the ratio
Qwen3/Mixtral is also given graph for graph.

Usage: PYTHONPATH=. python tools/bench_families.py [--work DIR] [--threads 2] [--rounds 5]
       [--prompt-len 64] [--new-tokens 128] [--json] [--tiny]
(--tiny: the same on two tiny configs, seconds instead of minutes: what the test suite runs.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: bench_export's child-process export

from bench_export import export_in_child  # noqa: E402

from mixport.exporter.tiny import MINI_MIXTRAL, MINI_QWEN3_MOE  # noqa: E402
from mixport.models import MoEConfig  # noqa: E402

MODELS = {"mini-Mixtral": MINI_MIXTRAL, "mini-Qwen3-MoE": MINI_QWEN3_MOE}
TINY_SIZES = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "head_dim": 16, "intermediate_size": 32,
              "num_local_experts": 4, "num_experts_per_tok": 2}  # --tiny: the script's logic in seconds


def prepare(work: Path, name: str, cfg: MoEConfig) -> tuple[Path, dict[str, Any]]:
    """(export folder, how the export went), reused when WORK already holds it."""
    from mixport.exporter.tiny import write_tiny

    src, out = work / f"{name}-src", work / f"{name}-export"
    info: dict[str, Any] = {"reused": True}
    if not (src / "config.json").is_file():
        t = time.perf_counter()
        write_tiny(src, cfg, seed=0)
        info["write_s"] = time.perf_counter() - t
    if not (out / "manifest.json").is_file():
        seconds, peak = export_in_child(src, out, fuse=True)
        info = {**info, "reused": False, "export_s": seconds, "export_peak_rss_mb": peak}
    info["weights_mb"] = sum(f.stat().st_size for f in out.glob("model.onnx*") if f.is_file()) / 1e6
    return out, info


def timed_rounds(pipes: dict[Any, Any], rounds: int, prompt_len: int, new_tokens: int) -> dict[str, dict[str, float]]:
    """Median prefill ms / prefill tok/s / decode tok/s per pipeline, rounds alternating between them."""
    from mixport.tools.bench import bench_session

    rows: dict[Any, list[Any]] = {key: [] for key in pipes}
    for _ in range(rounds):
        for key, pipe in pipes.items():
            rows[key].append(bench_session(pipe.session, pipe.vocab_size, pipe.context, prompt_len, new_tokens,
                                           batch=1, runs=1))
    out = {}
    for key, got in rows.items():
        prefill = statistics.median(r.prefill_ms for r in got)
        out[key] = {"prefill_ms": prefill, "prefill_tok_s": prompt_len / prefill * 1e3,
                    "decode_tok_s": statistics.median(r.decode_tok_s for r in got)}
    return out


def main() -> None:
    from mixport.runtime import load
    from mixport.tools.bench import graph_reason, rss_mb

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="Folder to keep the exports in (reused).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="Tiny configs (a smoke run of this script).")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mixport-bench-families-"))
    models = {name: replace(cfg, **TINY_SIZES) if args.tiny else cfg for name, cfg in MODELS.items()}
    res: dict[str, Any] = {"threads": args.threads, "rounds": args.rounds, "prompt_len": args.prompt_len,
                           "new_tokens": args.new_tokens, "tiny": args.tiny, "models": {}}
    load0 = os.getloadavg()[0]
    pipes: dict[tuple[str, str], Any] = {}
    for name, cfg in models.items():
        folder, info = prepare(work, name, cfg)
        res["models"][name] = {**info, "folder": str(folder), "experts": cfg.num_local_experts,
                               "top_k": cfg.num_experts_per_tok, "expert_width": cfg.intermediate_size}
        for asked in ("auto", "portable"):
            pipe = load(folder, threads=args.threads, graph=asked, backend="onnxruntime")
            ran = pipe.graph
            res["models"][name][asked] = {"graph": ran, "reason": graph_reason(
                pipe.config, pipe.manifest.dtype, pipe.backend, ran, asked) or "the fast graph (as `mixport run`)"}
            if asked == "portable" and ran == res["models"][name]["auto"]["graph"]:
                pipe.close()  # auto already runs model.onnx: its timing stands for both
                res["models"][name][asked]["reason"] = "timed once: auto runs model.onnx too"
                continue
            pipes[(name, asked)] = pipe
    res["rss_mb_loaded"] = rss_mb()
    timings = timed_rounds(pipes, args.rounds, args.prompt_len, args.new_tokens)
    for name in models:
        for asked in ("auto", "portable"):
            key = (name, asked) if (name, asked) in timings else (name, "auto")
            res["models"][name][asked].update(timings[key])
    res["loadavg_start_end"] = [load0, os.getloadavg()[0]]
    report(res)
    if args.json:
        print(json.dumps(res, indent=2))


def report(res: dict[str, Any]) -> None:
    (a_name, a), (b_name, b) = res["models"].items()
    print(f"mixport bench, fp32, prompt {res['prompt_len']}, {res['new_tokens']} new tokens, batch 1, "
          f"{res['threads']} threads, median of {res['rounds']} alternating rounds (load avg "
          f"{res['loadavg_start_end'][0]:.1f} -> {res['loadavg_start_end'][1]:.1f})"
          + (" [--tiny configs]" if res["tiny"] else ""))
    for name, m in res["models"].items():
        made = ("export reused" if m["reused"] else
                f"export {m['export_s']:.1f} s, peak RSS {m['export_peak_rss_mb']:.0f} MB")
        print(f"  {name}: {m['experts']} experts x {m['expert_width']}, top-{m['top_k']}; "
              f"{m['weights_mb']:.0f} MB model.onnx; {made}")
    print(f"  {'graph':<28} {'model':<16} {'prefill ms':>10} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for asked, label in (("auto", "as `mixport run` (auto)"), ("portable", "portable model.onnx")):
        for name, m in res["models"].items():
            row = m[asked]
            print(f"  {label:<28} {name:<16} {row['prefill_ms']:>10.1f} {row['prefill_tok_s']:>14.0f} "
                  f"{row['decode_tok_s']:>13.1f}   ran: {row['graph']} ({row['reason']})")
        print(f"  {'':<28} {'Qwen3/Mixtral':<16} {'':>10} "
              f"{b[asked]['prefill_tok_s'] / a[asked]['prefill_tok_s']:>13.2f}x "
              f"{b[asked]['decode_tok_s'] / a[asked]['decode_tok_s']:>12.2f}x")
    print(f"  RSS with all sessions loaded: {res['rss_mb_loaded']:.0f} MB ({a_name}, {b_name})")


if __name__ == "__main__":
    main()
