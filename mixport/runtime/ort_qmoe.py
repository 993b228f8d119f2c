"""The fast graph's quantized sparse experts as one ``com.microsoft.QMoE`` per layer, whose inputs are
written with the graph, in QMoE's layouts, to ``PARTS`` (one file beside it).

Measured on the mini-Mixtral int4 / int8 with lm_head quantized (ONNX Runtime 1.32 CPU, 1 thread,
accuracy level 4, 64-token prompt, medians of 15 runs on a loaded 2-core machine): QMoE decodes 7-22%
faster than the sparse body with one MatMulNBits per expert slab (int4: 221 vs 206 tok/s, int8: 205
vs 167; profiled node time 2.4x lower: 16 MatMulNBits per layer, most on 0 rows, plus the sort /
gather / scatter nodes, against one node), and prefills 64 tokens 10-15% slower. Decode wins.

QMoE wants its own layouts (``lower_ort_moe``: MatMulNBits rows per expert, gate/up interleaved, fp32
scales [E, N, blocks]), not model.onnx's [E, K, N] blocks, so its weights, scales and zero points are
made from model.onnx's stacks once, when the graph is built (``write_parts``: one expert's weights at a
time), and recorded in the model's metadata (``META``: the stacked model.onnx tensor, fc1 or fc2, which
part, its offset in PARTS). ``OrtFastSession`` gives them to ONNX Runtime in place from a read-only
memory map of that file (``mapped_parts``, ``SessionOptions.add_initializer``: shared initializers are
not copied). ONNX Runtime packs the weights into its own layout; the scales QMoE's CPU kernel copies
into its packed weights but does not prepack, so ONNX Runtime keeps whatever buffer they came in.
Mapped, every part is file pages, which the kernel can drop under memory pressure while the session
packs, and which ``release`` drops from this process once it has (read again, nothing was seen to,
they come back from the file, never stale). Measured at 2 real Mixtral-8x7B layers, int4:

* the weights made in memory at each load and handed over from memory
  (``add_external_initializers``) were held twice while ONNX Runtime packed them (its copy and
  ours): a load peak (VmHWM) of 1.8x the weights, and 45-95 s of each load spent making them;
* the scales handed over from memory stayed as an anonymous second copy of every scale: 336 MiB,
  12% of the weights.

Experts QMoE cannot express (``lower_ort_moe.qmoe_refusal``: a partial last block; 8-bit experts below
accuracy level 4, which its CPU kernel computes with int8 activations anyway) keep the sparse body,
whose weights point at model.onnx.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mixport import ops
from mixport.passes import lower_ort_moe, nbits
from mixport.runtime import onnx_locate, ort_weights
from mixport.runtime.ort_emit import MS, Builder
from mixport.runtime.ort_weights import QUANTIZED, SCALE, ZERO

PARTS = "model.ort.onnx.qmoe"  # written with the graph: QMoE's weights, scales, zero points in its layouts
OLD_PARTS = "model.ort.onnx.scales"  # graph version 7's (the scales only), removed when its graph is rebuilt
ALIGN = 1 << 16  # each part of PARTS starts at a multiple of this (pages, for the memory maps)
META = "mixport.qmoe"  # metadata_props key: {initializer in PARTS: recipe}
ROLES = (("weights", QUANTIZED), ("scales", SCALE), ("zero_points", ZERO))


def expressible(g: Builder, i: int) -> tuple[int, int, int] | None:
    """(bits, block size, normalize_routing_weights) when QMoE can run layer i's quantized experts
    from model.onnx's stacks (a graph built to sit beside it), else None."""
    cfg, gate = g.cfg, g.names.expert_weight(i, 0, "gate")
    origin = g.origins.get(gate)
    normalize = lower_ort_moe.contrib_routing(cfg.routing())
    if origin is None or isinstance(normalize, str) or origin.tensor + QUANTIZED not in g.where:
        return None
    q, scale = dict.__getitem__(g.w, gate + QUANTIZED), dict.__getitem__(g.w, gate + SCALE)
    bits, block = nbits.bits_of(q), nbits.block_size_of(q.shape[0], scale.shape[0])
    if block is None or lower_ort_moe.qmoe_refusal(cfg.hidden_size, cfg.intermediate_size, bits, block):
        return None
    if bits == 8 and g.accuracy_level < 4:  # 8-bit QMoE has no fp32-activation kernel
        return None
    return bits, block, normalize


def emit(g: Builder, i: int, flat: str, logits: str, bits: int, block: int, normalize: int) -> str:
    """Layer i's quantized experts as one QMoE on flat [T, H] routed by ``logits`` [T, E]."""
    cfg = g.cfg
    origin = g.origins[g.names.expert_weight(i, 0, "gate")]
    for e in range(cfg.num_local_experts):  # every view of the stacks is used (by the parts)
        for role in ("gate", "up", "down"):
            for _, suffix in ROLES:
                g.w.get(g.names.expert_weight(i, e, role) + suffix)
    base = origin.tensor.rsplit(".", 1)[0]  # <experts>
    inputs = {fc: [_part(g, f"{base}.{stack}", fc, part, suffix) for part, suffix in ROLES]
              for fc, stack in (("fc1", "gate_up"), ("fc2", "down"))}
    fc1_bias, fc2_bias = _biases(g, i, base)
    names = [flat, logits, inputs["fc1"][0], inputs["fc1"][1], fc1_bias, inputs["fc2"][0], inputs["fc2"][1], fc2_bias]
    if inputs["fc1"][2]:
        names += ["", "", "", inputs["fc1"][2], inputs["fc2"][2]]
    clamped = (cfg.swiglu_alpha, cfg.swiglu_limit) if cfg.expert_activation == "swiglu_clamped" else None
    attrs = dict(lower_ort_moe.contrib_attrs(cfg.num_experts_per_tok, normalize, clamped), expert_weight_bits=bits,
                 block_size=block, accuracy_level=g.accuracy_level)
    if g.dtype == np.float32:
        return g.op1("QMoE", names, MS, **attrs)
    # fp16 graph: QMoE runs in fp32 (its fp16 kernel converts the activations to fp32 anyway, and keeps an
    # fp32 copy of every fp16 scale beside the packed weights, 168 MiB a Mixtral-8x7B int4 layer)
    names[:2] = [g.op1("Cast", [n], to=onnx.TensorProto.FLOAT) for n in names[:2]]
    return g.op1("Cast", [g.op1("QMoE", names, MS, **attrs)], to=g.elem)


def _biases(g: Builder, i: int, base: str) -> tuple[str, str]:
    """QMoE's fc1 bias (gate|up interleaved, as its weights) and fc2 bias from model.onnx's version-"3"
    stacks (GPT-OSS), or empty inputs."""
    if not g.cfg.expert_bias:
        return "", ""
    gate_up, down = (np.asarray(g.w[f"{base}.{name}"], np.float32) for name in ops.BIAS_INPUTS)
    fc1, fc2 = f"{base}.qmoe_fc1_bias", f"{base}.qmoe_fc2_bias"  # fp32, as QMoE runs (emit)
    g.inits += [numpy_helper.from_array(lower_ort_moe.interleave_columns(gate_up), fc1),
                numpy_helper.from_array(down, fc2)]
    return fc1, fc2


def _part(g: Builder, stack: str, fc: str, part: str, suffix: str) -> str:
    """An initializer in PARTS: QMoE's ``part`` of ``fc`` made from model.onnx's ``stack``."""
    source = stack + suffix
    if source not in g.where:
        return ""
    dtype, shape = _made_shape(g, stack, suffix, part)
    name = f"{stack}.qmoe_{part}"
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    where = onnx_locate.Where(PARTS, parts_size(g.qmoe), nbytes)
    g.inits.append(where.pointer(name, helper.np_dtype_to_tensor_dtype(dtype), shape))
    g.qmoe[name] = dict(source=source, fc=fc, part=part, offset=where.offset, bytes=nbytes)
    return name


def parts_size(recipes: dict[str, dict[str, Any]]) -> int:
    """The size of PARTS for these recipes (each part ALIGN-aligned)."""
    ends = [r["offset"] + r["bytes"] for r in recipes.values()]
    return -(-max(ends, default=0) // ALIGN) * ALIGN


def _made_shape(g: Builder, stack: str, suffix: str, part: str) -> tuple[np.dtype, list[int]]:
    """The type and shape ``_made`` / ``expert_rows`` give QMoE's ``part`` of ``stack`` (worked out
    from expert 0's views: nothing is converted while the graph is built)."""
    roles = {"gate_up": ("gate", "up"), "down": ("down",)}[stack.rsplit(".", 1)[1]]
    layer = int(stack.split(".")[1])
    views = [g.w[g.names.expert_weight(layer, 0, r) + suffix] for r in roles]
    count, rows, cols = g.cfg.num_local_experts, views[0].shape[0], sum(v.shape[1] for v in views)
    if part == "scales":
        return np.dtype(np.float32), [count, cols, rows]  # fp32, as QMoE runs (emit)
    if part == "zero_points":
        return np.dtype(np.uint8), [count, cols, (rows + 1) // 2]
    return np.dtype(np.uint8), [count, cols, rows * nbits.bits_of(views[0]) // 8]


def _made(stacked: np.ndarray, fc: str, part: str) -> np.ndarray:
    """QMoE's scales / zero points of ``fc`` from the stacked [E, K / block, N] scale / zero."""
    if fc == "fc1":
        stacked = lower_ort_moe.interleave_columns(stacked)  # type: ignore[assignment]
    if part == "scales":
        return np.ascontiguousarray(np.swapaxes(stacked, 1, 2), dtype=np.float32)
    return np.stack([nbits.pack_zero_points(z) for z in stacked])


def record(proto: onnx.ModelProto, recipes: dict[str, dict[str, Any]]) -> None:
    """Keep the recipes of the parts in PARTS in the model's metadata."""
    if recipes:
        helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                       META: json.dumps(recipes, sort_keys=True)})


def parts_of(proto: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    """{initializer name: recipe} of a fast graph's parts in PARTS (read without its weights)."""
    raw = next((p.value for p in proto.metadata_props if p.key == META), None)
    return json.loads(raw) if raw else {}


def write_parts(folder: Path, recipes: dict[str, dict[str, Any]], path: Path) -> None:
    """Write PATH (the graph's PARTS): QMoE's weights / scales / zero points of ``recipes`` made from
    FOLDER/model.onnx's stacked tensors (read through memory maps), each at its offset; the weights
    one expert at a time, so nothing bigger than one expert's is in memory."""
    if not recipes:
        return
    proto = onnx_locate.skeleton(Path(folder) / "model.onnx")
    tensors = {t.name: t for t in proto.graph.initializer}
    with Path(path).open("wb") as f:
        for name, r in sorted(recipes.items(), key=lambda item: item[1]["offset"]):
            tensor = tensors[r["source"]]
            f.seek(r["offset"])
            if r["part"] == "weights":
                pieces = expert_rows(ort_weights.tensor_bytes(Path(folder), tensor), tensor.data_type,
                                     list(tensor.dims), r["fc"] == "fc1")
            else:
                pieces = [_made(ort_weights.tensor_array(Path(folder), tensor), r["fc"], r["part"])]
            written = 0
            for piece in pieces:
                written += f.write(np.ascontiguousarray(piece).data)
            if written != r["bytes"]:
                raise ValueError(f"{name}: made {written} bytes, the graph expects {r['bytes']}")
        f.truncate(parts_size(recipes))


def parts_ready(folder: Path, recipes: dict[str, dict[str, Any]]) -> bool:
    """Is FOLDER's PARTS there, as big as these recipes need?"""
    size = parts_size(recipes)
    path = Path(folder) / PARTS
    return size == 0 or (path.is_file() and path.stat().st_size >= size)


def mapped_parts(folder: Path, recipes: dict[str, dict[str, Any]], proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The parts in FOLDER's PARTS as read-only arrays mapped from the file (``proto``: the graph, for
    their types and shapes); ``release`` drops their pages once a session has read them."""
    if not recipes:
        return {}
    mapped = np.memmap(Path(folder) / PARTS, np.uint8, "r")
    tensors = {t.name: t for t in proto.graph.initializer if t.name in recipes}
    out = {}
    for name, r in recipes.items():
        t = tensors[name]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        out[name] = mapped[r["offset"]:r["offset"] + r["bytes"]].view(dtype).reshape(list(t.dims))
    return out


def release(arrays: dict[str, np.ndarray]) -> None:
    """Drop the pages of the memory maps behind ``arrays`` from this process (``MADV_DONTNEED``: a later
    read maps them again from the file)."""
    import mmap

    seen = set()
    for arr in arrays.values():
        base = arr
        while base is not None and not isinstance(base, np.memmap):
            base = base.base
        mm = getattr(base, "_mmap", None)
        if mm is not None and id(mm) not in seen and hasattr(mmap, "MADV_DONTNEED"):
            seen.add(id(mm))
            mm.madvise(mmap.MADV_DONTNEED)


def expert_rows(raw: np.ndarray, data_type: int, dims: list[int], interleave: bool) -> Iterator[np.ndarray]:
    """QMoE's weights, one expert [N, K * bits / 8] at a time (``nbits.expert_rows``' layout: each
    output column's K unsigned codes, packed two per byte for 4 bits; gate/up columns interleaved for
    fc1), from the stacked q [E, K, N]'s bytes ``raw`` (int8 [E, K, N], or int4 / uint4 packed flat), in
    uint8: the same bytes as unpacking the whole stack (exact; tests/runtime/test_ort_memory.py),
    without its int16 / ml_dtypes copies (1-layer Mixtral-8x7B int4: 35 s and 8 GB peak before)."""
    count, k, n = dims
    bits = 8 if data_type == onnx.TensorProto.INT8 else 4
    order = np.arange(n).reshape(2, n // 2).T.reshape(-1) if interleave else None  # g0, u0, g1, u1, ...
    per = k * n * bits // 8
    flat = raw.reshape(-1).view(np.uint8)
    for e in range(count):
        part = np.asarray(flat[e * per:(e + 1) * per])
        if bits == 8:
            codes = (part ^ 0x80).reshape(k, n)  # int8 + 128
        else:
            pairs = part.reshape(k, n // 2)
            codes = np.empty((k, n), np.uint8)
            codes[:, 0::2], codes[:, 1::2] = pairs & 0x0F, pairs >> 4
            if data_type == onnx.TensorProto.INT4:
                codes ^= 0x08  # int4 + 8
        rows = (codes if order is None else codes[:, order]).T  # [N, K]
        yield np.ascontiguousarray(rows) if bits == 8 else rows[:, 0::2] | (rows[:, 1::2] << 4)
