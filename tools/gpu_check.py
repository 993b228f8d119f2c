"""GPU check of the mixport MoE kernels: correctness vs PyTorch, timing vs PyTorch and roofline.

    tools/gpu_check.sh                       # on a GPU machine (torch + triton)
    python tools/gpu_check.py --interpret --small   # CPU smoke test (Triton interpreter)

# T tokens, E experts, H hidden, F intermediate, k active

Correctness: routing, align and fused_moe (fp16 / bf16 / fp32) against a
plain PyTorch implementation accumulated in fp32. Timing (median of CUDA-event
timed runs) of ``fused_moe`` and of the PyTorch loop over experts
(index_select / matmul / index_add_), against the memory roofline: bytes of
the experts actually hit / device-to-device copy bandwidth measured here.
Exit status 0 when every correctness check passes, 3 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PARITY_FAILED = 3


@dataclass(frozen=True)
class Shape:
    """One MoE layer size."""

    name: str
    hidden: int
    inter: int
    experts: int
    top_k: int


MIXTRAL = Shape("mixtral-8x7b", 4096, 14336, 8, 2)
SMALL = Shape("small", 1024, 3584, 8, 2)
TINY = Shape("tiny", 80, 96, 8, 2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true",
                        help="run on CPU in the Triton interpreter (smoke test)")
    parser.add_argument("--small", action="store_true", help="tiny shapes and few tokens only")
    parser.add_argument("--iters", type=int, default=10, help="timed runs per measurement")
    return parser.parse_args(argv)


def torch_moe(torch: Any, hidden: Any, weights: Any, ids: Any, gate_up: Any, down: Any,
              *, fp32: bool = False) -> Any:
    """Plain PyTorch MoE: loop over hit experts with index_select / index_add_."""
    t, k, f = ids.shape[0], ids.shape[1], down.shape[1]
    out = torch.zeros(t, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1).float()
    for e in torch.unique(flat_ids).tolist():
        pos = (flat_ids == e).nonzero().squeeze(1)                   # [n] pair indices
        tok = pos // k
        x = hidden.index_select(0, tok)                              # [n, H]
        wu, wd = (gate_up[e].float(), down[e].float()) if fp32 else (gate_up[e], down[e])
        h = (x.float() if fp32 else x) @ wu                          # [n, 2F]
        act = torch.nn.functional.silu(h[:, :f]) * h[:, f:]
        out.index_add_(0, tok, (act @ wd).float() * flat_w[pos, None])
    return out.to(hidden.dtype)


def make_layer(torch: Any, shape: Shape, t: int, dtype: Any, device: str, seed: int = 0) -> dict:
    """Random layer + routed top-k weights/ids for T = t tokens."""
    from mixport.plugins.kernels import topk_routing

    g = torch.Generator(device=device).manual_seed(seed)
    h, f, e = shape.hidden, shape.inter, shape.experts
    logits = torch.randn(t, e, device=device, generator=g)
    weights, ids = topk_routing(logits.to(dtype), shape.top_k)
    return {
        "hidden": torch.randn(t, h, device=device, generator=g).to(dtype),
        "weights": weights, "ids": ids,
        "gate_up": (torch.randn(e, h, 2 * f, device=device, generator=g) / h**0.5).to(dtype),
        "down": (torch.randn(e, f, h, device=device, generator=g) / f**0.5).to(dtype),
    }


TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}


def check_routing(torch: Any, device: str) -> list[str]:
    """topk_routing vs PyTorch fp32, both orders: softmax -> topk, or topk -> softmax over the k
    (-> renormalize); 16 experts top-2 and Qwen3-MoE's 128 experts top-8."""
    from mixport.plugins.kernels import topk_routing

    failures = []
    for experts, k in ((16, 2), (128, 8)):
        logits = torch.randn(1000, experts, device=device, generator=torch.Generator(device).manual_seed(1))
        for order in ("softmax_topk", "topk_softmax"):
            for norm in ("renormalize", "none"):
                w, ids = topk_routing(logits, k, norm, order)
                if order == "softmax_topk":
                    rw, rids = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
                else:
                    top, rids = torch.topk(logits.float(), k, dim=-1)
                    rw = torch.softmax(top, dim=-1)
                if norm == "renormalize":
                    rw = rw / rw.sum(-1, keepdim=True)
                if not torch.equal(ids, rids) or (w - rw).abs().max().item() > 1e-5:
                    failures.append(f"routing E={experts} k={k} {order} {norm}: ids or weights differ")
    return failures


def check_align(torch: Any, device: str) -> list[str]:
    """moe_align_block_size vs the NumPy reference."""
    import numpy as np

    from mixport.plugins.kernels import moe_align_block_size
    from mixport.plugins.kernels.reference import reference_align

    ids = torch.randint(0, 7, (333, 2), device=device,
                        generator=torch.Generator(device).manual_seed(2))   # expert 7 unused
    sorted_ids, expert_ids, num_post = moe_align_block_size(ids, 8, 16)
    r_sorted, r_experts, r_post = reference_align(ids.cpu(), 8, 16)
    same = (int(num_post.item()) == r_post and np.array_equal(sorted_ids.cpu().numpy(), r_sorted)
            and np.array_equal(expert_ids.cpu().numpy(), r_experts))
    return [] if same else ["align: differs from reference_align"]


def check_moe(torch: Any, shape: Shape, t: int, dtype: Any, device: str) -> list[str]:
    """fused_moe vs torch_moe accumulated in fp32; also run-to-run bitwise determinism."""
    from mixport.plugins.kernels import fused_moe

    layer = make_layer(torch, shape, t, dtype, device, seed=t)
    out = fused_moe(**layer)
    ref = torch_moe(torch, **layer, fp32=True).float()
    err = (out.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
    name = str(dtype).removeprefix("torch.")
    failures = [] if err <= TOLERANCE[name] else [f"moe {shape.name} T={t} {name}: rel err {err:.2e}"]
    if not torch.equal(out, fused_moe(**layer)):
        failures.append(f"moe {shape.name} T={t} {name}: not deterministic")
    print(f"  moe {shape.name:12s} T={t:<5d} {name:9s} rel err {err:.2e}", file=sys.stderr)
    return failures


def timed(torch: Any, fn: Callable[[], Any], iters: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events on GPU, perf_counter on CPU)."""
    fn()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(torch: Any, device: str, nbytes: int) -> float:
    """Device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timed(torch, lambda: dst.copy_(src), 10)
    return 2 * nbytes / (ms * 1e-3)


def bench_row(torch: Any, shape: Shape, t: int, dtype: Any, device: str, bw: float,
              iters: int) -> str:
    """One table row: fused vs PyTorch loop vs weight-streaming roofline."""
    from mixport.plugins.kernels import fused_moe

    layer = make_layer(torch, shape, t, dtype, device, seed=t)
    fused_ms = timed(torch, lambda: fused_moe(**layer), iters)
    loop_ms = timed(torch, lambda: torch_moe(torch, **layer), iters)
    hit = int(torch.unique(layer["ids"]).numel())
    elem = layer["hidden"].element_size()
    nbytes = hit * 3 * shape.hidden * shape.inter * elem + 2 * t * shape.hidden * elem
    roof_ms = nbytes / bw * 1e3
    return (f"{shape.name:12s} {t:6d} {hit:4d} {fused_ms:10.3f} {loop_ms:10.3f} {roof_ms:10.3f}"
            f" {roof_ms / fused_ms:8.1%} {loop_ms / fused_ms:8.2f}x")


def run(args: argparse.Namespace) -> int:
    import torch

    from mixport.plugins.kernels._runtime import interpret_mode

    device = "cpu" if interpret_mode() else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --interpret for a CPU smoke test", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes, tokens = ([TINY], [1, 16]) if args.small else ([SMALL, MIXTRAL], [1, 16, 128, 1024])
    print(f"device {device}: correctness", file=sys.stderr)
    failures = check_routing(torch, device) + check_align(torch, device)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    for t in (1, 37, 300) if not args.small else (1, 37):
        failures += [f for dt in dtypes for f in check_moe(torch, shapes[0], t, dt, device)]
    failures += check_moe(torch, shapes[-1], 16, torch.bfloat16, device)
    bw = copy_bandwidth(torch, device, (1 << 24) if args.small else (1 << 31))
    print(f"\ncopy bandwidth {bw / 1e9:.0f} GB/s; bf16 timings in ms (median of {args.iters})")
    print(f"{'shape':12s} {'T':>6s} {'hit':>4s} {'fused':>10s} {'torch':>10s} {'roofline':>10s}"
          f" {'%roof':>8s} {'speedup':>9s}")
    for shape in shapes:
        for t in tokens:
            print(bench_row(torch, shape, t, torch.bfloat16, device, bw, args.iters), flush=True)
    for failure in failures:
        print(f"FAIL {failure}")
    print("correctness: " + ("FAILED" if failures else "all passed"))
    return PARITY_FAILED if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"      # before anything imports triton
    if args.small and args.iters == 10:
        args.iters = 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
