"""lower_ort_moe (target ``ort`` only): mixport MoE + its TopKRouting -> ``com.microsoft.MoE``.

The contrib op routes by itself from the router logits: softmax over the E logits -> top-k,
then divides by the top-k sum when ``normalize_routing_weights=1``. Every TopKRouting mode
maps onto that (``contrib_normalize``):

* order softmax_topk, normalization renormalize -> normalize_routing_weights=1 (Mixtral, Qwen3-MoE);
* order softmax_topk, normalization none -> normalize_routing_weights=0 (Qwen2-MoE, OLMoE);
* order topk_softmax (either normalization) -> normalize_routing_weights=1 (Granite): the softmax
  over the k largest logits equals the top k of the softmax over all E divided by their sum
  (exp(l_i)/sum_k exp(l_j): the full softmax's denominator cancels; softmax is monotonic, so the
  same k experts are picked), and renormalizing weights that already sum to 1 changes nothing.
  ORT's outputs match the function body's within the tests' tolerance (tests/passes/test_small_passes.py).

TopKRouting version 3 (``contrib_routing``): a routed_scaling_factor with softmax routing folds into the
down weights (float experts only); sigmoid scores, a selection-only bias and grouped top-k have no
com.microsoft.MoE field and are refused with the reason; sparsemixer is refused too, since ONNX Runtime
1.32's CPU MoE ignores ``use_sparse_mixer`` (measured: its output equals plain softmax -> top-k).

It wants, on CPU, gate/up interleaved per row ([E, 2F, H]: g0, u0, g1, u1, ...) and
the down weights as [E, H, F] (both [out, in]). The file then runs in ONNX Runtime only.

Quantized experts (MoE plugin_version "2") become ``com.microsoft.QMoE`` (contrib op schema of ONNX
Runtime 1.32): ``expert_weight_bits`` 8 | 4, ``block_size`` B, the same routing and SwiGLU settings,
``swiglu_fusion`` 1 (its CPU kernel takes interleaved gate/up only), fc1 = gate|up with its columns
interleaved, fc2 = down, each per expert in MatMulNBits' rows (``passes/nbits``: [E, N, K*bits/8]
unsigned codes, scales [E, N, K/B], uint4 zero points packed [E, N, ceil(K/B/2)]); exact since
every block belongs to one column. What ONNX Runtime 1.32's CPU QMoE cannot express is refused with
the reason: a block size that does not divide H and F (the contract allows a last, partial block;
QMoE requires whole blocks). Measured on its CPU kernel: 4-bit experts compute exactly at
``accuracy_level`` 0/1 and with int8 activations at 4; 8-bit experts have no fp32 kernel and
quantize the activations to int8 at every level (the file's numbers then differ from the portable
body's by that rounding, as the fast graph's at ``QUANT_ACCURACY_LEVEL`` do). ``accuracy_level`` is
``nbits.ACCURACY_LEVEL``, the level ``mixport run`` uses.

Expert biases and the clamped SwiGLU (MoE plugin_version "3", GPT-OSS) map exactly: the contrib ops'
fc1 / fc2 biases take gate_up_bias (its columns interleaved like fc1) and down_bias, and their swiglu
computes (clamp(u, -swiglu_limit, swiglu_limit) + activation_beta) * c * sigmoid(activation_alpha * c)
with c = min(g, swiglu_limit): "swiglu_clamped" is activation_alpha = alpha, activation_beta = 1,
swiglu_limit = limit; plain "swiglu" keeps alpha 1, beta 0 and no limit.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from mixport import ops
from mixport.onnx_io import WeightFiles
from mixport.passes import graph_utils as gu
from mixport.passes import nbits

NAME = "lower_ort_moe"
MS_DOMAIN = "com.microsoft"


def interleaved_fc1(gate_up: np.ndarray) -> np.ndarray:
    """[E, H, 2F] (gate | up) -> [E, 2F, H] with rows g0, u0, g1, u1, ..."""
    e, h, two_f = gate_up.shape
    f = two_f // 2
    pairs = np.stack([gate_up[:, :, :f], gate_up[:, :, f:]], axis=-1)  # [E, H, F, 2]
    return np.ascontiguousarray(pairs.reshape(e, h, two_f).transpose(0, 2, 1))


def contrib_fc2(down: np.ndarray) -> np.ndarray:
    """[E, F, H] -> [E, H, F]."""
    return np.ascontiguousarray(down.transpose(0, 2, 1))


def contrib_attrs(k: int, normalize: int = 1, clamped: tuple[float, float] | None = None) -> dict[str, object]:
    """The contrib op's attributes; ``clamped``: (alpha, limit) of the swiglu_clamped activation."""
    attrs: dict[str, object] = dict(k=k, activation_type="swiglu", swiglu_fusion=1,
                                    normalize_routing_weights=normalize, activation_alpha=1.0, activation_beta=0.0)
    if clamped is not None:
        attrs.update(activation_alpha=float(clamped[0]), activation_beta=1.0, swiglu_limit=float(clamped[1]))
    return attrs


def clamped_of(moe: gs.Node) -> tuple[float, float] | None:
    """(alpha, limit) of a version-"3" node with the swiglu_clamped activation, else None."""
    if moe.attrs.get("activation") != "swiglu_clamped":
        return None
    return float(moe.attrs["alpha"]), float(moe.attrs["limit"])


def _biases(graph: gs.Graph, moe: gs.Node, files: WeightFiles | None) -> tuple[gs.Tensor, gs.Tensor] | str:
    """A version-"3" node's (fc1 bias [E, 2F] interleaved, fc2 bias [E, H]), or empty inputs for an
    older node; a reason string when they are not constants."""
    if moe.attrs.get("plugin_version") != ops.BIAS_PLUGIN_VERSION:
        return gs.Variable.empty(), gs.Variable.empty()
    gate_up_bias, down_bias = (gu.const_array(t) for t in moe.inputs[-len(ops.BIAS_INPUTS):])
    if gate_up_bias is None or down_bias is None:
        return f"MoE '{moe.name}': expert biases are not constants"
    name = moe.inputs[-2].name
    return (gu.make_constant(gu.unique_name(graph, f"{name}.ort_fc1_bias"), interleave_columns(gate_up_bias), files),
            moe.inputs[-1])


def contrib_normalize(order: str, normalization: str) -> int | str:
    """``normalize_routing_weights`` (0 or 1) that makes com.microsoft.MoE compute this routing mode,
    or why it cannot (see the module docstring)."""
    if order == "topk_softmax" and normalization in ops.NORMALIZATIONS:
        return 1  # softmax over the top-k logits == softmax -> top-k -> renormalize
    if order == "softmax_topk" and normalization in ops.NORMALIZATIONS:
        return int(normalization == "renormalize")
    return (f"com.microsoft.MoE routes softmax -> top-k (-> renormalize) only (router has order={order!r}, "
            f"normalization={normalization!r})")


def contrib_routing(spec: ops.RoutingSpec, scaling_folds: bool = False) -> int | str:
    """``normalize_routing_weights`` for a TopKRouting spec (version 3 included), or the one line saying
    which field com.microsoft.MoE / QMoE cannot express. ``scaling_folds``: a routed_scaling_factor is
    folded into the experts' down weights by the caller (the weights are linear in it)."""
    if spec.scoring == "sparsemixer":
        return ("TopKRouting scoring 'sparsemixer' (PhiMoE) cannot map: ONNX Runtime 1.32's CPU MoE ignores "
                "use_sparse_mixer (measured: it routes softmax -> top-k)")
    if spec.scoring != "softmax":
        return f"TopKRouting scoring {spec.scoring!r} cannot map: com.microsoft.MoE scores with a softmax"
    if spec.bias:
        return "TopKRouting's selection bias (e_score_correction_bias) cannot map: com.microsoft.MoE has no such input"
    if spec.n_group > 1:
        return (f"TopKRouting grouped top-k (n_group={spec.n_group}, topk_group={spec.topk_group}) cannot map: "
                "com.microsoft.MoE picks the top-k of all experts")
    if spec.scaling != 1.0 and not scaling_folds:
        return f"TopKRouting routed_scaling_factor={spec.scaling:g} cannot map: com.microsoft.QMoE has no scale"
    return contrib_normalize(spec.order, spec.normalization)


def _lower(graph: gs.Graph, moe: gs.Node, files: WeightFiles | None) -> str | None:
    """Replace one MoE node; a reason string when it cannot be lowered."""
    router = gu.producer(moe.inputs[1])
    if router is None or router.op != ops.TOPK_ROUTING or gu.producer(moe.inputs[2]) is not router:
        return f"MoE '{moe.name}': weights/ids do not come from one TopKRouting node"
    spec = ops.RoutingSpec.from_attributes(router.attrs, has_bias=len(router.inputs) > 1
                                           and not router.inputs[1].is_empty())
    quantized = "bits" in moe.attrs
    normalize = contrib_routing(spec, scaling_folds=not quantized)
    if isinstance(normalize, str):
        return f"MoE '{moe.name}': {normalize}"
    if moe.attrs.get("activation", "swiglu") not in ops.ACTIVATIONS:
        return f"MoE '{moe.name}': activation {moe.attrs.get('activation')!r} has no com.microsoft.MoE form"
    biases = _biases(graph, moe, files)
    if isinstance(biases, str):
        return biases
    if quantized:
        return _lower_quantized(graph, moe, router, normalize, files, biases)
    gate_up, down = gu.const_array(moe.inputs[3]), gu.const_array(moe.inputs[4])
    if gate_up is None or down is None:
        return f"MoE '{moe.name}': expert weights are not constants"
    experts = len(gate_up)  # each expert's layout made and written in turn: one in memory, not the stack
    fc1 = gu.stacked_constant(gu.unique_name(graph, f"{moe.inputs[3].name}.ort_fc1"),
                              (interleaved_fc1(w[None])[0] for w in gu.slabs(moe.inputs[3])), experts, files)
    scale = spec.scaling  # out = sum_j (s w_j) FFN_j(x): s folds into each expert's down weights
    fc2 = gu.stacked_constant(gu.unique_name(graph, f"{moe.inputs[4].name}.ort_fc2"),
                              (contrib_fc2(w[None] if scale == 1.0 else (w * np.asarray(scale, w.dtype))[None])[0]
                               for w in gu.slabs(moe.inputs[4])), experts, files)
    fc2_bias = biases[1]
    if scale != 1.0 and not fc2_bias.is_empty():  # s (down @ act + b) = (s down) @ act + s b
        bias = gu.const_array(fc2_bias)
        fc2_bias = gu.make_constant(gu.unique_name(graph, f"{fc2_bias.name}.ort_scaled"),
                                    bias * np.asarray(scale, bias.dtype), files)
    node = gs.Node("MoE", f"{moe.name}/ort", contrib_attrs(int(moe.attrs["k"]), normalize, clamped_of(moe)),
                   [moe.inputs[0], router.inputs[0], fc1, biases[0], fc2, fc2_bias], list(moe.outputs),
                   domain=MS_DOMAIN)
    moe.outputs.clear()
    graph.nodes.append(node)
    return None


def qmoe_refusal(hidden: int, inter: int, bits: int, block: int) -> str | None:
    """Why ONNX Runtime 1.32's CPU QMoE cannot take these experts (None: it can)."""
    if bits not in (4, 8):
        return f"QMoE takes 4- or 8-bit experts (these are {bits}-bit)"
    if block < nbits.MIN_BLOCK or hidden % block or inter % block:
        return (f"com.microsoft.QMoE needs whole blocks: block_size {block} must divide hidden {hidden} and "
                f"intermediate {inter} (and be >= {nbits.MIN_BLOCK}); mixport's last block may be partial")
    return None


def interleave_columns(a: np.ndarray | None) -> np.ndarray | None:
    """[E, K, 2F] gate | up columns -> [E, K, 2F] columns g0, u0, g1, u1, ... (QMoE's swiglu_fusion=1)."""
    if a is None:
        return None
    f = a.shape[-1] // 2
    return np.stack([a[..., :f], a[..., f:]], axis=-1).reshape(a.shape)


def _lower_quantized(graph: gs.Graph, moe: gs.Node, router: gs.Node, normalize: int,
                     files: WeightFiles | None, biases: tuple[gs.Tensor, gs.Tensor]) -> str | None:
    """One quantized MoE node -> com.microsoft.QMoE; a reason string when it cannot."""
    bits, block = int(moe.attrs["bits"]), int(moe.attrs["block_size"])
    extended = moe.attrs.get("plugin_version") == ops.BIAS_PLUGIN_VERSION
    arrays = [gu.const_array(t) for t in moe.inputs[3:len(moe.inputs) - (len(ops.BIAS_INPUTS) if extended else 0)]]
    if any(a is None for a in arrays):
        return f"MoE '{moe.name}': expert weights are not constants"
    gate_up, down, gate_up_scale, down_scale, *zeros = arrays
    h, f = gate_up.shape[1], down.shape[1]
    why = qmoe_refusal(h, f, bits, block)
    if why:
        return f"MoE '{moe.name}': {why}"
    gate_up_zero, down_zero = zeros or (None, None)
    fc1 = nbits.expert_rows(interleave_columns(gate_up), interleave_columns(gate_up_scale),  # type: ignore[arg-type]
                            interleave_columns(gate_up_zero), block)
    fc2 = nbits.expert_rows(down, down_scale, down_zero, block)
    made = {}
    for fc, (weights, scales, zp), source in (("fc1", fc1, moe.inputs[3]), ("fc2", fc2, moe.inputs[4])):
        for part, value in (("weights", weights), ("scales", scales), ("zero_points", zp)):
            if value is not None:
                made[f"{fc}_{part}"] = gu.make_constant(gu.unique_name(graph, f"{source.name}.qmoe_{part}"), value,
                                                        files)
    empty = gs.Variable.empty
    inputs = [moe.inputs[0], router.inputs[0], made["fc1_weights"], made["fc1_scales"], biases[0],
              made["fc2_weights"], made["fc2_scales"], biases[1]]
    if "fc1_zero_points" in made:
        inputs += [empty(), empty(), empty(), made["fc1_zero_points"], made["fc2_zero_points"]]
    attrs = dict(contrib_attrs(int(moe.attrs["k"]), normalize, clamped_of(moe)), expert_weight_bits=bits,
                 block_size=block, accuracy_level=nbits.ACCURACY_LEVEL)
    node = gs.Node("QMoE", f"{moe.name}/ort", attrs, inputs, list(moe.outputs), domain=MS_DOMAIN)
    moe.outputs.clear()
    graph.nodes.append(node)
    return None


def apply(graph: gs.Graph, reasons: list[str] | None = None, files: WeightFiles | None = None) -> int:
    """Lower every lowerable MoE node; return how many were lowered. With ``files``, the
    contrib layouts of the expert weights are written to their work file as they are made."""
    reasons = reasons if reasons is not None else []
    moes = gu.mixport_nodes(graph, ops.MOE)
    if not moes:
        reasons.append(f"{NAME}: no {ops.DOMAIN}::{ops.MOE} node to lower")
    lowered = 0
    for moe in moes:
        why = _lower(graph, moe, files)
        if why:
            reasons.append(f"{NAME}: {why}")
        else:
            lowered += 1
    if lowered:
        if not any(d.domain == MS_DOMAIN for d in graph.import_domains):
            graph.import_domains.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
        graph.cleanup().toposort()
    return lowered
