"""The fast graph's quantized sparse experts as one ``com.microsoft.QMoE`` per layer, whose weights are
made from model.onnx's when the session starts (the fast graph's file holds no copy of them).

Measured on the mini-Mixtral int4 / int8 with lm_head quantized (ONNX Runtime 1.32 CPU, 1 thread,
accuracy level 4, 64-token prompt, medians of 15 runs on a loaded 2-core machine): QMoE decodes 7-22%
faster than the sparse body with one MatMulNBits per expert slab (int4: 221 vs 206 tok/s, int8: 205
vs 167; profiled node time 2.4x lower: 16 MatMulNBits per layer, most on 0 rows, plus the sort /
gather / scatter nodes, against one node), and prefills 64 tokens 10-15% slower. Decode wins.

QMoE wants its own layouts (``lower_ort_moe``: MatMulNBits rows per expert, gate/up interleaved), not
model.onnx's [E, K, N] blocks, so its six weight inputs are placeholders in the file: external data in
``MARKER``, a file never written (a plain ONNX Runtime session refuses the graph loudly instead of
reading wrong bytes), with a recipe per placeholder in the model's metadata (``META``: the stacked
model.onnx tensor, its type and shape, fc1 or fc2, which part). ``OrtFastSession`` computes them
(``materialize``) and hands them over with ``SessionOptions.add_external_initializers``; ONNX
Runtime then packs them into its own layout. Experts QMoE cannot express (``lower_ort_moe.
qmoe_refusal``: a partial last block; 8-bit experts below accuracy level 4, which its CPU kernel
computes with int8 activations anyway) keep the sparse body, whose weights point at model.onnx.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mixport.passes import lower_ort_moe, nbits
from mixport.runtime import onnx_locate
from mixport.runtime.ort_emit import MS, Builder
from mixport.runtime.ort_weights import QUANTIZED, SCALE, ZERO

MARKER = "model.ort.qmoe"  # never written: the session supplies these initializers
META = "mixport.qmoe"  # metadata_props key: {placeholder: recipe}
PARTS = (("weights", QUANTIZED), ("scales", SCALE), ("zero_points", ZERO))


def expressible(g: Builder, i: int) -> tuple[int, int, int] | None:
    """(bits, block size, normalize_routing_weights) when QMoE can run layer i's quantized experts
    from model.onnx's stacks (a graph built to sit beside it), else None."""
    cfg, gate = g.cfg, g.names.expert_weight(i, 0, "gate")
    origin = g.origins.get(gate)
    normalize = lower_ort_moe.contrib_normalize(cfg.routing_order, cfg.normalization)
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
    for e in range(cfg.num_local_experts):  # every view of the stacks is used (by the placeholders)
        for role in ("gate", "up", "down"):
            for _, suffix in PARTS:
                g.w.get(g.names.expert_weight(i, e, role) + suffix)
    base = origin.tensor.rsplit(".", 1)[0]  # <experts>
    inputs = {fc: [_placeholder(g, f"{base}.{stack}", fc, part, suffix, block) for part, suffix in PARTS]
              for fc, stack in (("fc1", "gate_up"), ("fc2", "down"))}
    names = [flat, logits, inputs["fc1"][0], inputs["fc1"][1], "", inputs["fc2"][0], inputs["fc2"][1], ""]
    if inputs["fc1"][2]:
        names += ["", "", "", inputs["fc1"][2], inputs["fc2"][2]]
    attrs = dict(lower_ort_moe.contrib_attrs(cfg.num_experts_per_tok, normalize), expert_weight_bits=bits,
                 block_size=block, accuracy_level=g.accuracy_level)
    return g.op1("QMoE", names, MS, **attrs)


def _placeholder(g: Builder, stack: str, fc: str, part: str, suffix: str, block: int) -> str:
    """An initializer the session supplies: QMoE's ``part`` of ``fc`` made from model.onnx's ``stack``."""
    source = stack + suffix
    if source not in g.where:
        return ""
    value = _made(_stacked(g, stack, suffix), fc, part, block)
    name = f"{stack}.qmoe_{part}"
    g.inits.append(onnx_locate.Where(MARKER, 0, value.nbytes).pointer(
        name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)))
    g.qmoe[name] = dict(source=source, fc=fc, part=part, block=block)
    return name


def _stacked(g: Builder, stack: str, suffix: str) -> np.ndarray:
    """The stacked [E, K, N] tensor again, from the per-expert views export_weights made of it."""
    roles = {"gate_up": ("gate", "up"), "down": ("down",)}[stack.rsplit(".", 1)[1]]
    layer = int(stack.split(".")[1])
    experts = range(g.cfg.num_local_experts)
    return np.stack([np.concatenate([g.w[g.names.expert_weight(layer, e, r) + suffix] for r in roles], axis=1)
                     for e in experts])


def _made(stacked: np.ndarray, fc: str, part: str, block: int) -> np.ndarray:
    """QMoE's input ``part`` of ``fc`` from the stacked [E, K, N] q / scale / zero of that part."""
    if fc == "fc1":
        stacked = lower_ort_moe.interleave_columns(stacked)  # type: ignore[assignment]
    if part == "scales":
        return np.ascontiguousarray(np.swapaxes(stacked, 1, 2))
    if part == "zero_points":
        return np.stack([nbits.pack_zero_points(z) for z in stacked])
    ones = np.ones((stacked.shape[0], nbits.quant.blocks(stacked.shape[1], block), stacked.shape[2]), np.float32)
    return nbits.expert_rows(stacked, ones, None, block)[0]


def record(proto: onnx.ModelProto, recipes: dict[str, dict[str, Any]]) -> None:
    """Keep the placeholders' recipes in the model's metadata."""
    if recipes:
        helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                       META: json.dumps(recipes, sort_keys=True)})


def placeholders(proto: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    """{placeholder name: recipe} of a fast graph (read without its weights)."""
    raw = next((p.value for p in proto.metadata_props if p.key == META), None)
    return json.loads(raw) if raw else {}


def materialize(folder: Path, recipes: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    """The placeholders' values, made from FOLDER/model.onnx's stacked tensors."""
    if not recipes:
        return {}
    model = Path(folder) / "model.onnx"
    where = onnx_locate.locate(model)
    proto = onnx.load(str(model), load_external_data=False)
    kinds = {t.name: (t.data_type, list(t.dims)) for t in proto.graph.initializer}
    out = {}
    for name, r in recipes.items():
        stacked = _read(Path(folder), where[r["source"]], *kinds[r["source"]])
        out[name] = _made(stacked, r["fc"], r["part"], int(r["block"]))
    return out


def _read(folder: Path, where: onnx_locate.Where, data_type: int, dims: list[int]) -> np.ndarray:
    with (folder / where.location).open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        raw = bytes(buf[where.offset:where.offset + where.length])
    return numpy_helper.to_array(TensorProto(data_type=data_type, dims=dims, raw_data=raw))
