"""Generation speed of `mixport run` on ONNX Runtime CPU, against PyTorch and the memory bound.

Builds the mini-Mixtral (vocab 32000, hidden 512, intermediate 1792, 4 layers, 8/2 heads,
8 experts, top-2, fp32), exports it, then prints in one run:

* mixport prefill ms / decode tok/s, timed through the session and loop `mixport run` uses
  (fast graph, and the portable model.onnx for comparison);
* PyTorch eager: transformers MixtralForCausalLM.generate with its KV cache;
* GEMV bandwidth: one large MatMul in ORT, hot (one 65 MB matrix, cache-resident on big-L3
  hosts) and cold (a chain of matrices larger than the last-level cache);
* an ORT graph of only the model's MatMuls, each step feeding rows to the k experts a random
  router picks per layer (0 rows to the others): the bound with ORT's own GEMV;
* the fraction of the bandwidth bound: decode tok/s / (bandwidth / weight bytes per token);
* RSS before / after generation.

Usage: PYTHONPATH=. python tools/bench_run.py [--work DIR] [--threads 2] [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from mixport.exporter.tiny import MINI_MIXTRAL as MINI
from mixport.models import MoEConfig


def build_export(work: Path) -> tuple[Path, Path]:
    """(HF source folder, export folder), reused when already in WORK."""
    from mixport.exporter.export import export
    from mixport.exporter.tiny import write_tiny

    src, out = work / "mini-src", work / "mini-export"
    if not (src / "config.json").is_file():
        write_tiny(src, cfg=MINI, seed=0)
    if not (out / "manifest.json").is_file():
        t = time.perf_counter()
        export(src, out, force=True)  # fused, as `mixport export` writes it
        print(f"# exported {out} in {time.perf_counter() - t:.0f} s")
    return src, out


def decode_bytes(cfg: MoEConfig, itemsize: int = 4) -> int:
    """Weight bytes one decode token reads: attention, router, k experts per layer, lm_head."""
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = h * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d + cfg.num_attention_heads * d * h
    layer = attn + h * cfg.num_local_experts + cfg.num_experts_per_tok * 3 * h * f
    return (cfg.num_hidden_layers * layer + h * cfg.vocab_size) * itemsize


def _ort_time(model, feeds: list[dict], threads: int, reps: int) -> float:  # noqa: ANN001
    """Seconds per run, cycling through ``feeds`` (after a warm-up pass over them)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    for feed in feeds[:8]:
        sess.run(None, feed)
    t = time.perf_counter()
    for i in range(reps):
        sess.run(None, feeds[i % len(feeds)])
    return (time.perf_counter() - t) / reps


def _matmul_graph(shapes: list[tuple[int, int]]):  # -> onnx.ModelProto
    """One MatMul per [K, N] weight, each fed its own input x{i} [M, K] (M = 0 skips it)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, inputs, outputs = [], [], [], []
    for i, (k, n) in enumerate(shapes):
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), f"w{i}"))
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, ["m", k]))
        nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["m", n]))
    graph = helper.make_graph(nodes, "mm", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def gemv_bandwidth(threads: int, matrices: int) -> float:
    """GB/s of [1, 512] @ [512, 32000] MatMuls over ``matrices`` distinct 65.5 MB weights."""
    model = _matmul_graph([(512, 32000)] * matrices)
    feed = {f"x{i}": np.ones((1, 512), np.float32) for i in range(matrices)}
    return matrices * 512 * 32000 * 4 / _ort_time(model, [feed], threads, max(10, 200 // matrices)) / 1e9


def matmul_only_steps(cfg: MoEConfig, threads: int, steps: int = 64) -> float:
    """Steps/s of a graph holding only the model's MatMuls, each step feeding rows to the
    attention, router, lm_head and k random experts per layer (the others get 0 rows)."""
    h, f, d, e_n = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_local_experts
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d
    layer = [(h, qkv), (cfg.num_attention_heads * d, h), (h, e_n)] + [(h, 2 * f), (f, h)] * e_n
    shapes = layer * cfg.num_hidden_layers + [(h, cfg.vocab_size)]
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(steps):
        rows = np.ones(len(shapes), dtype=int)
        for layer_i in range(cfg.num_hidden_layers):
            off = layer_i * len(layer) + 3
            chosen = rng.choice(e_n, cfg.num_experts_per_tok, replace=False)
            for e in range(e_n):
                rows[off + 2 * e: off + 2 * e + 2] = int(e in chosen)
        feeds.append({f"x{i}": np.ones((m, k), np.float32)
                      for i, ((k, _), m) in enumerate(zip(shapes, rows, strict=True))})
    return 1.0 / _ort_time(_matmul_graph(shapes), feeds, threads, steps)


def mixport_runner(folder: Path, threads: int, graph: str, new_tokens: int):  # -> () -> (prefill s, decode s)
    """One timed generation through the session and loop calls `mixport run` uses."""
    from mixport.runtime import load
    from mixport.tools.bench import time_once

    pipe = load(folder, threads=threads, graph=graph)
    prompt = np.random.default_rng(0).integers(3, MINI.vocab_size, 64).tolist()
    time_once(pipe.session, [prompt], 4)  # warm-up
    return lambda: time_once(pipe.session, [prompt], new_tokens)


class _Stamps:
    """A generate() streamer that only records when each token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, _value: object) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def torch_runner(src: Path, threads: int, new_tokens: int):  # -> () -> (prefill s, decode s)
    """transformers MixtralForCausalLM.generate (greedy, KV cache), timed from per-token
    timestamps: time to the first token, then the other tokens."""
    import torch
    from transformers import MixtralForCausalLM

    torch.set_num_threads(threads)
    model = MixtralForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(3, MINI.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True, pad_token_id=0)

    def timed(n: int) -> tuple[float, float]:
        stamps = _Stamps()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, streamer=stamps, **kw)
        first, *_, last = stamps.times[1:]
        return first - t, last - first

    timed(4)
    return lambda: timed(new_tokens)


def interleaved(runners: dict, runs: int, new_tokens: int) -> dict:
    """Rounds of one run per runner, so that other jobs' load hits all of them alike;
    per runner the median prefill ms / decode tok/s, and per round the ratios to mixport."""
    rounds = [{name: run() for name, run in runners.items()} for _ in range(runs)]
    out: dict = {}
    for name in runners:
        out[name] = {"prefill_ms": float(np.median([r[name][0] for r in rounds])) * 1e3,
                     "decode_tok_s": (new_tokens - 1) / float(np.median([r[name][1] for r in rounds]))}
    out["decode_speedup_vs_pytorch"] = float(np.median([r["pytorch"][1] / r["mixport"][1] for r in rounds]))
    out["prefill_speedup_vs_pytorch"] = float(np.median([r["pytorch"][0] / r["mixport"][0] for r in rounds]))
    return out


def main() -> None:
    from mixport.tools.bench import rss_mb

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="Folder to keep the export in (reused).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    src, folder = build_export(args.work or Path(tempfile.mkdtemp(prefix="mixport-bench-run-")))
    load0 = os.getloadavg()[0]
    res: dict = {"threads": args.threads, "new_tokens": args.new_tokens, "prompt_len": 64}
    portable = mixport_runner(folder, args.threads, "portable", 16)()
    res["mixport_portable"] = {"prefill_ms": portable[0] * 1e3, "decode_tok_s": 15 / portable[1]}
    fast = mixport_runner(folder, args.threads, "fast", args.new_tokens)
    res["rss_before"] = rss_mb()
    for _ in range(3):
        fast()
    res["rss_after"] = rss_mb()  # after 3 generations of new_tokens (before PyTorch is loaded)
    res.update(interleaved({"mixport": fast, "pytorch": torch_runner(src, args.threads, args.new_tokens)},
                           args.runs, args.new_tokens))
    res["gemv_gb_s_hot"] = gemv_bandwidth(args.threads, 1)
    res["gemv_gb_s_cold"] = gemv_bandwidth(args.threads, 8)
    res["matmul_only_steps_s"] = matmul_only_steps(MINI, args.threads)
    res["decode_weight_mb"] = decode_bytes(MINI) / 1e6
    res["loadavg_start_end"] = [load0, os.getloadavg()[0]]
    report(res)
    if args.json:
        print(json.dumps(res, indent=2))


def report(r: dict) -> None:
    mb = r["decode_weight_mb"]
    m, pt, port = r["mixport"], r["pytorch"], r["mixport_portable"]
    bound_hot = r["gemv_gb_s_hot"] * 1e3 / mb
    bound_cold = r["gemv_gb_s_cold"] * 1e3 / mb
    print(f"mini-Mixtral fp32, prompt {r['prompt_len']}, {r['new_tokens']} new tokens, {r['threads']} threads "
          f"(load avg {r['loadavg_start_end'][0]:.1f} -> {r['loadavg_start_end'][1]:.1f})")
    print(f"  mixport (fast graph)     prefill {m['prefill_ms']:7.1f} ms   decode {m['decode_tok_s']:7.1f} tok/s")
    print(f"  mixport (portable graph) prefill {port['prefill_ms']:7.1f} ms   decode {port['decode_tok_s']:7.1f} tok/s")
    print(f"  PyTorch eager (HF)       prefill {pt['prefill_ms']:7.1f} ms   decode {pt['decode_tok_s']:7.1f} tok/s")
    print(f"  GEMV bandwidth: hot {r['gemv_gb_s_hot']:.1f} GB/s, cold {r['gemv_gb_s_cold']:.1f} GB/s; "
          f"weights per decode token {mb:.0f} MB")
    print(f"  bound: hot {bound_hot:.0f} steps/s, cold {bound_cold:.0f} steps/s; "
          f"MatMul-only ORT graph (random top-k) {r['matmul_only_steps_s']:.0f} steps/s")
    print(f"  ratios: mixport/PyTorch decode {r['decode_speedup_vs_pytorch']:.2f}x, "
          f"prefill {r['prefill_speedup_vs_pytorch']:.2f}x (median of interleaved rounds); fraction of bound: hot "
          f"{m['decode_tok_s'] / bound_hot:.2f}, cold {m['decode_tok_s'] / bound_cold:.2f}, "
          f"MatMul-only {m['decode_tok_s'] / r['matmul_only_steps_s']:.2f}")
    print(f"  RSS: {r['rss_before']:.0f} MB before generation, {r['rss_after']:.0f} MB after 3 generations")


if __name__ == "__main__":
    main()
