"""Where a decode step's time goes in the fast ONNX Runtime graph (`mixport run` on CPU): ONNX
Runtime's own profiler, node time summed per op type over a prefill and N greedy decode steps.

Run: python tools/profile_fast.py FOLDER [--threads 2] [--prompt-len 64] [--new-tokens 64] [--batch 1]
(FOLDER: a `mixport export` folder; its fast graph is built into it when missing).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from mixport import artifact
from mixport.runtime import ort_fast, ort_graph, ort_session
from mixport.tools.bench import time_once


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together (continuous batching's steps)")
    args = ap.parse_args()
    manifest = artifact.Manifest.read(args.folder)
    plain = ort_session.session_options

    def profiled(threads: int | None, config: dict[str, str] | None = None):  # noqa: ANN202
        opts = plain(threads, config)
        opts.enable_profiling, opts.profile_file_prefix = True, str(args.folder / "profile")
        return opts

    ort_session.session_options = profiled  # the session mixport runs, with the profiler on
    session = ort_fast.OrtFastSession(ort_graph.ensure(args.folder, manifest), manifest, threads=args.threads)
    rng = np.random.default_rng(0)
    prompt = [rng.integers(3, manifest.config["vocab_size"], args.prompt_len).tolist() for _ in range(args.batch)]
    time_once(session, prompt, 4)  # warm-up, then the profiled run
    prefill, decode = time_once(session, prompt, args.new_tokens)
    trace = session.sess.end_profiling()
    events = json.load(open(trace))
    os.remove(trace)
    spent: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            spent[e["args"]["op_name"]] += e["dur"] / 1e3
    total = sum(spent.values())
    steps = args.new_tokens - 1
    rate = args.batch * steps / decode
    print(f"{args.folder}: batch {args.batch}, last run prefill {prefill * 1e3:.1f} ms, decode {rate:.1f} tok/s "
          f"(profiler on; both runs' node time below: {total:.1f} ms)")
    for op, ms in sorted(spent.items(), key=lambda x: -x[1])[:12]:
        print(f"  {op:34} {ms:9.2f} ms  {100 * ms / total:5.1f} %")


if __name__ == "__main__":
    main()
