"""Export time / peak RSS, and prefill + decode speed of the mini-Mixtral through `mixport run`'s
path, next to PyTorch eager (transformers' generate with a KV cache), in one run.

    python tools/bench_export.py [--threads 2] [--prompt-len 64] [--new-tokens 128] [--no-fuse] [--external-data]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EXPORT_SCRIPT = """
import sys, time, json
from mixport import artifact
from mixport.exporter.export import export
if sys.argv[4] == "1":
    artifact.TWO_GB = 1 << 20  # the path of checkpoints past 2 GB: model.onnx.data, streamed
t = time.perf_counter()
export(sys.argv[1], sys.argv[2], fuse=sys.argv[3] == "1")
seconds = time.perf_counter() - t
status = open("/proc/self/status").read()  # VmHWM: this process's peak RSS since exec (kB)
peak = next((int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM:")), None)
print(json.dumps({"seconds": seconds, "peak_kb": peak}))
"""


def export_in_child(src: Path, out: Path, fuse: bool, external: bool = False) -> tuple[float, float]:
    """(seconds, peak RSS MB) of the export, measured in a fresh process. The peak is the child's own
    (VmHWM); getrusage's ru_maxrss would count this process's memory, which a forked child starts with."""
    res = subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, str(src), str(out), "1" if fuse else "0",
                          "1" if external else "0"],
                         check=True, capture_output=True, text=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    peak = got["peak_kb"] / 1024 if got["peak_kb"] else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return got["seconds"], peak


def bench_mixport(out: Path, prompt: list[int], new_tokens: int, threads: int, runs: int) -> tuple[float, float]:
    """(prefill ms, decode tokens/s), medians; the same Session + loop `mixport run` uses."""
    from mixport.runtime import load
    from mixport.runtime.generate import GenerationRequest, iter_generate

    pipe = load(out, threads=threads)
    prefill, decode = [], []
    for _ in range(runs + 1):  # the first run is warm-up
        req = GenerationRequest([prompt], new_tokens, eos_ids=())
        stamps = [time.perf_counter()]
        for _row, _tok in iter_generate(pipe.session, req, pipe.context):
            stamps.append(time.perf_counter())
        prefill.append((stamps[1] - stamps[0]) * 1e3)
        decode.append((len(stamps) - 2) / (stamps[-1] - stamps[1]))
    return statistics.median(prefill[1:]), statistics.median(decode[1:])


def bench_torch(src: Path, prompt: list[int], new_tokens: int, threads: int, runs: int) -> tuple[float, float]:
    import torch
    from transformers import MixtralForCausalLM

    torch.set_num_threads(threads)
    model = MixtralForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    prefill, total = [], []
    with torch.no_grad():
        for _ in range(runs + 1):
            t = time.perf_counter()
            model(ids, use_cache=True)
            prefill.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            total.append(time.perf_counter() - t)
    p = statistics.median(prefill[1:])
    return p, (new_tokens - 1) / (statistics.median(total[1:]) - p / 1e3)


def main() -> None:
    from mixport.exporter.tiny import MINI_MIXTRAL, write_tiny

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-fuse", action="store_true")
    ap.add_argument("--external-data", action="store_true",
                    help="Write model.onnx.data as a checkpoint past 2 GB would (2 GB limit lowered to 1 MB).")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mixport-bench-") as tmp:
        src = write_tiny(Path(tmp) / "mini", MINI_MIXTRAL, seed=0)
        seconds, rss = export_in_child(src, Path(tmp) / "out", fuse=not args.no_fuse, external=args.external_data)
        prompt = np.random.default_rng(0).integers(3, MINI_MIXTRAL.vocab_size, args.prompt_len).tolist()
        m_pre, m_tps = bench_mixport(Path(tmp) / "out", prompt, args.new_tokens, args.threads, args.runs)
        t_pre, t_tps = bench_torch(src, prompt, args.new_tokens, args.threads, args.runs)
    print(f"mini-Mixtral fp32, {args.prompt_len}-token prompt, {args.new_tokens} new tokens, "
          f"{args.threads} threads, fused={not args.no_fuse}")
    layout = "model.onnx + model.onnx.data" if args.external_data else "one model.onnx"
    print(f"export ({layout}): {seconds:.1f} s, peak RSS {rss:.0f} MB")
    print(f"{'':<22}{'prefill ms':>12}{'decode tok/s':>14}")
    print(f"{'mixport (ORT CPU)':<22}{m_pre:>12.1f}{m_tps:>14.1f}")
    print(f"{'PyTorch eager (HF)':<22}{t_pre:>12.1f}{t_tps:>14.1f}")
    print(f"{'ratio mixport/eager':<22}{t_pre / m_pre:>11.2f}x{m_tps / t_tps:>13.2f}x  (higher is better)")


if __name__ == "__main__":
    main()
