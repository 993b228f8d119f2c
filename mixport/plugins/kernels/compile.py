"""Ahead-of-time compile of every kernel to PTX + cubin for sm_80 / sm_90, no GPU needed.

    python -m mixport.plugins.kernels.compile OUT_DIR [--arch 80 --arch 90] [-E 8] [-k 2]
        [--block-size 32 ...] [--no-quantized]

Writes ``<kernel>__<variant>__sm<arch>.ptx`` / ``.cubin`` and ``manifest.json``
listing, per file: kernel, entry symbol, arch, dtype, constexprs, runtime
parameters (name, type) in launch order, num_warps (block = 32*num_warps
threads), dynamic shared memory, grid formula, and divisibility assumptions.
A TensorRT ``aot_impl`` plugin (or ``cuModuleLoadData``) needs exactly these.
Every Triton entry takes two extra trailing pointer parameters (global and
profile scratch) that must be passed as null; the manifest records them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixport.ops import ORDERS
from mixport.plugins.kernels._runtime import Kernel, interpret_mode, require
from mixport.plugins.kernels.configs import REDUCE_BLOCK_H, gemm_config, quant_gemm_config
from mixport.quant import DEFAULT_BLOCK_SIZE

TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
DTYPES = tuple(TRITON_TYPES)
BLOCK_MS = (16, 64)
MAX_BLOCKS = "cdiv(T*k + E*(BLOCK_M-1), BLOCK_M)"
GRIDS = {
    "topk_routing_kernel": ["cdiv(T, BLOCK_T)", "1", "1"],
    "moe_align_kernel": ["1", "1", "1"],
    "gate_up_kernel": [MAX_BLOCKS, "cdiv(F, BLOCK_N)", "1"],
    "down_kernel": [MAX_BLOCKS, "cdiv(H, BLOCK_N)", "1"],
    "reduce_kernel": ["T", "cdiv(H, BLOCK_H)", "1"],
    "qgate_up_kernel": [MAX_BLOCKS, "cdiv(F, BLOCK_N)", "1"],
    "qdown_kernel": [MAX_BLOCKS, "cdiv(H, BLOCK_N)", "1"],
    "biased_gate_up_kernel": [MAX_BLOCKS, "cdiv(F, BLOCK_N)", "1"],
    "biased_down_kernel": [MAX_BLOCKS, "cdiv(H, BLOCK_N)", "1"],
}
QUANT_SCHEMES = {"int8": (8, False), "int4": (4, False), "int4-zp": (4, True)}  # name -> (BITS, HAS_ZERO)
TRAILING_PARAMS = [{"name": "global_scratch", "type": "*i8", "value": "null"},
                   {"name": "profile_scratch", "type": "*i8", "value": "null"}]


@dataclass
class Variant:
    """One specialization of one kernel: runtime signature, constexprs, launch options."""

    kernel: Kernel
    tag: str
    dtype: str
    signature: dict[str, str]            # runtime args only, in order: name -> triton type
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    divisible: tuple[str, ...] = ()      # int args assumed % 16 == 0
    notes: dict[str, Any] = field(default_factory=dict)


def _routing(dt: str, e: int, k: int) -> Iterator[Variant]:
    from mixport.plugins.kernels.routing import routing_meta, topk_routing_kernel

    ty = TRITON_TYPES[dt]
    for order in ORDERS:
        for renorm in (True, False):
            yield Variant(topk_routing_kernel, f"{dt}_E{e}_k{k}_{order}_{'renorm' if renorm else 'none'}", dt,
                          {"logits_ptr": f"*{ty}", "weights_ptr": f"*{ty}", "ids_ptr": "*i64",
                           "bias_ptr": f"*{ty}", "T": "i32", "E": "i32", "SCALE": "fp32", "TWO_EPS": "fp32"},
                          {"K": k, "RENORMALIZE": renorm, "TOPK_FIRST": order == "topk_softmax",
                           "SCORING": 0, "HAS_BIAS": False, "N_GROUP": 1, "TOPK_GROUP": 1, "GROUP_TOP2": False,
                           "GROUP_SIZE": e, **routing_meta(e, k)})  # version-3 modes: compiled on first use


def _align(e: int, block_m: int) -> Variant:
    from mixport.plugins.kernels.align import align_meta, moe_align_kernel

    return Variant(moe_align_kernel, f"E{e}_bm{block_m}", "int64",
                   {"ids_ptr": "*i64", "sorted_ptr": "*i32", "expert_ids_ptr": "*i32",
                    "num_post_ptr": "*i32", "P": "i32", "E": "i32", "max_padded": "i32",
                    "max_blocks": "i32"}, align_meta(e, block_m), num_warps=4, num_stages=1)


def _gemms(dt: str, k: int, block_m: int) -> Iterator[Variant]:
    from mixport.plugins.kernels import grouped_gemm as gg

    ty, cfg = TRITON_TYPES[dt], gemm_config(block_m, dt)
    common = {"UPCAST": False, "PRECISION": "ieee" if dt == "float32" else "tf32",
              **cfg.constexprs()}
    index = {"sorted_ptr": "*i32", "expert_ids_ptr": "*i32", "num_post_ptr": "*i32",
             "P": "i32", "H": "i32", "F": "i32"}
    launch = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "divisible": ("H", "F")}
    yield Variant(gg.gate_up_kernel, f"{dt}_k{k}_bm{block_m}", dt,
                  {"hidden_ptr": f"*{ty}", "gate_up_ptr": f"*{ty}", "inter_ptr": f"*{ty}", **index},
                  {"TOP_K": k, **common}, **launch)
    yield Variant(gg.down_kernel, f"{dt}_bm{block_m}", dt,
                  {"inter_ptr": f"*{ty}", "down_ptr": f"*{ty}", "weights_ptr": f"*{ty}",
                   "partial_ptr": "*fp32", **index}, common, **launch)


def _biased_gemms(dt: str, k: int, block_m: int) -> Iterator[Variant]:
    """MoE plugin_version 3's GEMMs (expert biases; the clamped SwiGLU or plain, constexpr CLAMPED)."""
    from mixport.plugins.kernels import biased_gemm as bg

    ty, cfg = TRITON_TYPES[dt], gemm_config(block_m, dt)
    common = {"UPCAST": False, "PRECISION": "ieee" if dt == "float32" else "tf32", **cfg.constexprs()}
    index = {"sorted_ptr": "*i32", "expert_ids_ptr": "*i32", "num_post_ptr": "*i32",
             "P": "i32", "H": "i32", "F": "i32"}
    launch = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "divisible": ("H", "F")}
    for clamped in (True, False):
        yield Variant(bg.biased_gate_up_kernel, f"{dt}_k{k}_bm{block_m}_{'clamped' if clamped else 'silu'}", dt,
                      {"hidden_ptr": f"*{ty}", "gate_up_ptr": f"*{ty}", "bias_ptr": f"*{ty}", "inter_ptr": f"*{ty}",
                       **index, "alpha": "fp32", "limit": "fp32"},
                      {"TOP_K": k, "CLAMPED": clamped, **common}, **launch)
    yield Variant(bg.biased_down_kernel, f"{dt}_bm{block_m}", dt,
                  {"inter_ptr": f"*{ty}", "down_ptr": f"*{ty}", "bias_ptr": f"*{ty}", "weights_ptr": f"*{ty}",
                   "partial_ptr": "*fp32", **index}, common, **launch)


def _quant_gemms(dt: str, k: int, block_m: int, scheme: str, block_size: int) -> Iterator[Variant]:
    """The quantized experts' GEMMs: weights int8 or packed int4 bytes (``qlayout``), scales in ``dt``."""
    from mixport.plugins.kernels import quant_gemm as qg

    ty, cfg = TRITON_TYPES[dt], quant_gemm_config(block_m, dt, block_size)
    bits, zero = QUANT_SCHEMES[scheme]
    common = {"UPCAST": False, "PRECISION": "ieee" if dt == "float32" else "tf32", **cfg.constexprs(),
              "BITS": bits, "HAS_ZERO": zero, "QBLOCK": block_size}
    qty = "*i8" if bits == 8 else "*u8"
    weights = {"q_ptr": qty, "scale_ptr": f"*{ty}", "zero_ptr": qty}  # zero_ptr: unused without zeros
    index = {"sorted_ptr": "*i32", "expert_ids_ptr": "*i32", "num_post_ptr": "*i32",
             "P": "i32", "H": "i32", "F": "i32"}
    launch = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "divisible": ("H", "F")}
    tag = f"{dt}_{scheme}_B{block_size}"
    yield Variant(qg.qgate_up_kernel, f"{tag}_k{k}_bm{block_m}", dt,
                  {"hidden_ptr": f"*{ty}", **weights, "inter_ptr": f"*{ty}", **index},
                  {"TOP_K": k, **common}, **launch)
    yield Variant(qg.qdown_kernel, f"{tag}_bm{block_m}", dt,
                  {"inter_ptr": f"*{ty}", **weights, "weights_ptr": f"*{ty}", "partial_ptr": "*fp32", **index},
                  common, **launch)


def variants(num_experts: int = 8, top_k: int = 2,
             block_sizes: Sequence[int] = (DEFAULT_BLOCK_SIZE,)) -> list[Variant]:
    """Every kernel specialization compile_all builds (per arch); quantized GEMMs for each
    scheme and each quantization block size in ``block_sizes`` (empty: none)."""
    from mixport.plugins.kernels.grouped_gemm import reduce_kernel

    out: list[Variant] = []
    for dt in DTYPES:
        out += _routing(dt, num_experts, top_k)
        for block_m in BLOCK_MS:
            out += _gemms(dt, top_k, block_m)
            out += _biased_gemms(dt, top_k, block_m)
            for scheme in QUANT_SCHEMES:
                for block_size in block_sizes:
                    out += _quant_gemms(dt, top_k, block_m, scheme, block_size)
        out.append(Variant(reduce_kernel, f"{dt}_k{top_k}", dt,
                           {"partial_ptr": "*fp32", "ids_ptr": "*i64",
                            "out_ptr": f"*{TRITON_TYPES[dt]}", "H": "i32", "E": "i32"},
                           {"TOP_K": top_k, "BLOCK_H": REDUCE_BLOCK_H}))
    out += [_align(num_experts, block_m) for block_m in BLOCK_MS]
    return out


def _compile_one(v: Variant, arch: int) -> Any:
    triton = require("triton", "ahead-of-time compiles")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = v.kernel.jit
    signature = {**v.signature, **{name: "constexpr" for name in v.constexprs}}
    signature = {name: signature[name] for name in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in v.signature.items()
             if t.startswith("*") or n in v.divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=v.constexprs, attrs=attrs)
    options = {"num_warps": v.num_warps, "num_stages": v.num_stages, "enable_fp_fusion": True}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _entry(v: Variant, arch: int, compiled: Any, files: dict[str, str]) -> dict[str, Any]:
    md = compiled.metadata
    ptx = compiled.asm["ptx"]
    match = re.search(r"\.visible \.entry (\w+)\((.*?)\)", ptx, re.S)
    return {
        "kernel": v.kernel.name, "variant": v.tag, "arch": f"sm_{arch}", "dtype": v.dtype,
        "entry": match.group(1) if match else md.name, "files": files,
        "params": [{"name": n, "type": t} for n, t in v.signature.items()] + TRAILING_PARAMS,
        "num_ptx_params": match.group(2).count(".param") if match else None,
        "constexprs": v.constexprs, "num_warps": md.num_warps, "threads_per_block": 32 * md.num_warps,
        "num_stages": md.num_stages, "grid": GRIDS[v.kernel.name],
        "shared_mem_bytes": md.shared,  # dynamic; > 48 KiB needs MAX_DYNAMIC_SHARED_SIZE_BYTES
        "requires": [f"{n} % 16 == 0" for n in v.divisible] + ["all pointers 16-byte aligned"],
        "ptx_version": ptx.split(".version", 1)[1].split()[0], "triton_hash": md.hash,
    }


def _compile_here(out_dir: Path, archs: Sequence[int], num_experts: int, top_k: int,
                  block_sizes: Sequence[int]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    manifest: list[dict[str, Any]] = []
    for arch in archs:
        for v in variants(num_experts, top_k, block_sizes):
            compiled = _compile_one(v, arch)
            stem = f"{v.kernel.name}__{v.tag}__sm{arch}"
            files = {"ptx": f"{stem}.ptx"}
            (out_dir / files["ptx"]).write_text(compiled.asm["ptx"])
            written.append(out_dir / files["ptx"])
            if compiled.asm.get("cubin"):
                files["cubin"] = f"{stem}.cubin"
                (out_dir / files["cubin"]).write_bytes(compiled.asm["cubin"])
                written.append(out_dir / files["cubin"])
            manifest.append(_entry(v, arch, compiled, files))
    path = out_dir / "manifest.json"
    path.write_text(json.dumps({"kernels": manifest, "pipeline": PIPELINE}, indent=1))
    return [*written, path]


PIPELINE = {
    "order": ["topk_routing_kernel", "moe_align_kernel", "gate_up_kernel", "down_kernel",
              "reduce_kernel"],
    "quantized": "qgate_up_kernel and qdown_kernel replace gate_up_kernel and down_kernel for MoE "
                 "plugin_version 2 (weights in the qlayout kernel layout; zero_ptr: any pointer "
                 "without zero points)",
    "biased": "biased_gate_up_kernel (CLAMPED: GPT-OSS's clamped SwiGLU) and biased_down_kernel replace "
              "gate_up_kernel and down_kernel for MoE plugin_version 3 (gate_up_bias [E, 2F], down_bias [E, H]; "
              "alpha, limit fp32)",
    "workspace": {
        "sorted_token_ids": "int32[T*k + E*(BLOCK_M-1)]",
        "expert_ids": "int32[cdiv(T*k + E*(BLOCK_M-1), BLOCK_M)]",
        "num_tokens_post_padded": "int32[1]",
        "inter": "dtype[T*k, F]",
        "partial": "float32[T*k, H]",
    },
    "block_m_rule": "16 if T*k <= 16*E else 64 (align and GEMMs must use the same BLOCK_M)",
}


def compile_all(out_dir: Path | str, archs: Sequence[int] = (80, 90), *, num_experts: int = 8,
                top_k: int = 2, block_sizes: Sequence[int] = (DEFAULT_BLOCK_SIZE,)) -> list[Path]:
    """Compile every kernel variant for each arch into ``out_dir``; return the files written.
    ``block_sizes``: the quantization blocks to build quantized GEMMs for (empty: none).

    In a TRITON_INTERPRET=1 process the work runs in a clean subprocess.
    """
    out_dir = Path(out_dir)
    if not interpret_mode():
        return _compile_here(out_dir, archs, num_experts, top_k, block_sizes)
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "mixport.plugins.kernels.compile", str(out_dir),
           "-E", str(num_experts), "-k", str(top_k), *[f"--arch={a}" for a in archs],
           *([f"--block-size={b}" for b in block_sizes] if block_sizes else ["--no-quantized"])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"kernel compile subprocess failed:\n{done.stderr[-4000:]}")
    manifest = json.loads((out_dir / "manifest.json").read_text())
    return [out_dir / f for e in manifest["kernels"] for f in e["files"].values()] + [
        out_dir / "manifest.json"]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: compile into OUT_DIR and print one line per file written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--arch", type=int, action="append", help="SM arch (repeatable)")
    parser.add_argument("-E", "--num-experts", type=int, default=8)
    parser.add_argument("-k", "--top-k", type=int, default=2)
    parser.add_argument("--block-size", type=int, action="append",
                        help=f"quantization block of the quantized GEMMs (repeatable; default {DEFAULT_BLOCK_SIZE})")
    parser.add_argument("--no-quantized", action="store_true", help="skip the quantized GEMMs")
    args = parser.parse_args(argv)
    blocks = () if args.no_quantized else tuple(args.block_size or (DEFAULT_BLOCK_SIZE,))
    for path in compile_all(args.out_dir, tuple(args.arch or (80, 90)),
                            num_experts=args.num_experts, top_k=args.top_k, block_sizes=blocks):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
