"""Benchmark the fused mixport MoE in ONNX Runtime (CPU): one layer, then a mini-Mixtral end to end.

Layer (H=512, F=1792, E=8, top-2) at T = 1, 16, 256: the exported dense all-experts
graph, ORT's com.microsoft.MoE (``--target ort``), the fused file (default ``portable``:
the ``sorted`` body), the same with the alternative ``nonzero`` body, and the fused file
with ORT's constant folding disabled (shows the per-run weight-slab copies folding
avoids). All sessions share one ORT thread pool and are timed round-robin, so load from
other processes hits them alike; medians in ms. "steady": 5 calls in a row per visit
(one layer called again and again, weights hot in cache); "cold": 1 call per visit,
after the other variants' weights went through the caches; "flushed": 1 call per visit
after streaming a buffer twice the size of the last-level cache, so every weight comes
from DRAM (a real model: every layer has its own weights, far more than any cache).

Usage: PYTHONPATH=. python tools/bench_moe.py [--threads 2] [--reps 60] [--skip-e2e]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from mixport.exporter.tiny import MINI_MIXTRAL as MINI
from mixport.passes import moe_bodies, run_pipeline
from mixport.tools.moe_layer import LayerSpec, dense_layer


def use_global_threads(threads: int) -> bool:
    """One ORT thread pool for every session of this process (before the first session is made):
    sessions timed in turn then cannot slow each other with their idle, spinning workers."""
    try:
        from onnxruntime.capi import _pybind_state

        _pybind_state.set_global_thread_pool_sizes(threads, 1)
    except (ImportError, AttributeError, RuntimeError):
        return False
    return True


GLOBAL_POOL: dict[str, bool] = {"on": False}


def session(model: onnx.ModelProto | str, threads: int, fold: bool = True) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if GLOBAL_POOL["on"]:
        opts.use_per_session_threads = False
    else:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=[] if fold else ["ConstantFolding"])


def cache_flusher() -> Callable[[], object]:
    """A call that streams a buffer of twice the last-level cache through it (evicts all weights)."""
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        llc = int(size[:-1]) * {"K": 2**10, "M": 2**20}[size[-1]] if size[-1] in "KM" else int(size)
    except (OSError, ValueError, KeyError):
        llc = 256 * 2**20
    buffer = np.ones(2 * llc // 4, np.float32)
    return buffer.sum


def round_robin(runs: dict[str, Callable[[], object]], rounds: int, inner: int = 1,
                flush: Callable[[], object] | None = None) -> dict[str, float]:
    """Median ms per variant. Each round visits every variant once; a visit runs once untimed,
    (then flushes the caches, if ``flush``), then times ``inner`` runs in a row.
    inner=1 is the cold case (weights of the other variants went through the caches in between);
    inner>1 adds the steady state of one layer called again and again (weights hot)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            fn()
            if flush is not None:
                flush()
            for _ in range(inner):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: float(np.median(ts)) for name, ts in times.items()}


MODES = {"steady": 5, "cold": 1, "flushed": 1}  # timed runs per visit (see round_robin)


def layer_models() -> tuple[onnx.ModelProto, ...]:
    """dense, fused, fused with the nonzero body, com.microsoft.MoE — built before the shared ORT
    pool exists (the passes fold constants through ORT sessions of their own)."""
    dense = dense_layer(LayerSpec())
    fused, _ = run_pipeline(dense)
    nonzero = copy.deepcopy(fused)
    moe_bodies.attach(nonzero, "nonzero")
    contrib, _ = run_pipeline(dense, target="ort")
    return dense, fused, nonzero, contrib


def bench_layer(models: tuple[onnx.ModelProto, ...], threads: int, reps: int
                ) -> list[tuple[int, str, dict[str, float]]]:
    dense, fused, nonzero, contrib = models
    sessions = {"dense": session(dense, threads), "com.microsoft.MoE": session(contrib, threads),
                "fused": session(fused, threads), "fused-nonzero": session(nonzero, threads),
                "fused-nofold": session(fused, threads, fold=False)}
    rng = np.random.default_rng(0)
    flush = cache_flusher()
    rows = []
    for t in (1, 16, 256):
        feed = {"hidden": rng.standard_normal((t, 512)).astype(np.float32)}
        ref = sessions["dense"].run(None, feed)[0]
        for name, s in sessions.items():
            err = float(np.abs(s.run(None, feed)[0] - ref).max())
            assert err < 1e-4, f"{name} disagrees with dense at T={t}: {err}"
        runs = {name: (lambda s=s, feed=feed: s.run(None, feed)) for name, s in sessions.items()}
        rounds = reps if t < 256 else max(reps // 4, 8)
        for mode, inner in MODES.items():
            n = max(rounds // inner, 4) if mode != "flushed" else max(rounds // 4, 8)
            rows.append((t, mode, round_robin(runs, n, inner, flush if mode == "flushed" else None)))
    return rows


def print_layer(rows: list[tuple[int, str, dict[str, float]]]) -> None:
    print("one MoE layer, H=512 F=1792 E=8 top-2, fp32, ORT CPU (median ms)")
    print(f"{'T':>5} {'mode':>7} {'dense':>9} {'ms.MoE':>9} {'fused':>9} {'fused/dense':>12} {'fused/ms.MoE':>13}"
          f" {'nonzero body':>13} {'fused no-fold':>14}")
    for t, mode, m in rows:
        print(f"{t:>5} {mode:>7} {m['dense']:>9.3f} {m['com.microsoft.MoE']:>9.3f} {m['fused']:>9.3f}"
              f" {m['fused'] / m['dense']:>12.2f} {m['fused'] / m['com.microsoft.MoE']:>13.2f}"
              f" {m['fused-nonzero']:>13.3f} {m['fused-nofold']:>14.3f}")


def _export_mini(work: Path) -> tuple[Path, Path]:
    from mixport.exporter.export import export
    from mixport.exporter.tiny import write_tiny

    unfused = work / "unfused"
    if not (unfused / "model.onnx").is_file():
        export(write_tiny(work / "hf", MINI, seed=0), unfused, fuse=False, force=True)
    fused = work / "fused.onnx"
    if not fused.is_file():
        proto, _ = run_pipeline(onnx.load(str(unfused / "model.onnx")))
        onnx.save_model(proto, str(fused))
    return unfused / "model.onnx", fused


def _feeds(prompt: int, layers: int) -> tuple[dict, dict]:
    kv = MINI.num_key_value_heads, MINI.head_dim
    ids = np.random.default_rng(0).integers(3, MINI.vocab_size, (1, prompt))
    pre = {"input_ids": ids, "attention_mask": np.ones((1, prompt), np.int64),
           "position_ids": np.arange(prompt)[None]}
    dec = {"input_ids": ids[:, :1], "attention_mask": np.ones((1, prompt + 1), np.int64),
           "position_ids": np.array([[prompt]])}
    for i in range(layers):
        for part in ("key", "value"):
            pre[f"past_key_values.{i}.{part}"] = np.zeros((1, kv[0], 0, kv[1]), np.float32)
            dec[f"past_key_values.{i}.{part}"] = np.zeros((1, kv[0], prompt, kv[1]), np.float32)
    return pre, dec


def bench_e2e(exports: tuple[Path, Path], threads: int, reps: int) -> dict[str, float]:
    unfused, fused = exports
    pre, dec = _feeds(64, MINI.num_hidden_layers)
    s_un, s_fu = session(str(unfused), threads), session(str(fused), threads)
    a, b = s_un.run(None, pre)[0], s_fu.run(None, pre)[0]
    assert float(np.abs(a - b).max()) < 1e-4, "fused mini-Mixtral disagrees with the unfused one"
    runs = {"prefill unfused": lambda: s_un.run(None, pre), "prefill fused": lambda: s_fu.run(None, pre),
            "decode unfused": lambda: s_un.run(None, dec), "decode fused": lambda: s_fu.run(None, dec)}
    return round_robin(runs, reps)


def print_e2e(m: dict[str, float]) -> None:
    print("mini-Mixtral (V=32000, H=512, F=1792, 4 layers, 8 experts top-2, fp32), 64-token prompt (median ms)")
    print(f"{'step':<8} {'unfused':>9} {'fused':>9} {'speed-up':>9}")
    for step in ("prefill", "decode"):
        u, f = m[f"{step} unfused"], m[f"{step} fused"]
        print(f"{step:<8} {u:>9.2f} {f:>9.2f} {u / f:>8.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None, help="Keep/reuse the mini-Mixtral exports here.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mixport-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        models = layer_models()  # everything that runs the passes, before the shared pool exists
        exports = None if args.skip_e2e else _export_mini(work)
        GLOBAL_POOL["on"] = use_global_threads(args.threads)
        pool = "one shared pool" if GLOBAL_POOL["on"] else "a pool per session"
        print(f"onnxruntime {ort.__version__}, {args.threads} intra-op threads ({pool}), "
              f"load average {os.getloadavg()[0]:.2f} (other processes share these cores)")
        print_layer(bench_layer(models, args.threads, args.reps))
        if exports is not None:
            print_e2e(bench_e2e(exports, args.threads, max(args.reps // 4, 10)))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
