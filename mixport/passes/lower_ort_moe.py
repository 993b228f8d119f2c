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

It wants, on CPU, gate/up interleaved per row ([E, 2F, H]: g0, u0, g1, u1, ...) and
the down weights as [E, H, F] (both [out, in]). The file then runs in ONNX Runtime only.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from mixport import ops
from mixport.onnx_io import WeightFiles
from mixport.passes import graph_utils as gu

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


def contrib_attrs(k: int, normalize: int = 1) -> dict[str, object]:
    return dict(k=k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=normalize,
                activation_alpha=1.0, activation_beta=0.0)


def contrib_normalize(order: str, normalization: str) -> int | str:
    """``normalize_routing_weights`` (0 or 1) that makes com.microsoft.MoE compute this routing mode,
    or why it cannot (see the module docstring)."""
    if order == "topk_softmax" and normalization in ops.NORMALIZATIONS:
        return 1  # softmax over the top-k logits == softmax -> top-k -> renormalize
    if order == "softmax_topk" and normalization in ops.NORMALIZATIONS:
        return int(normalization == "renormalize")
    return (f"com.microsoft.MoE routes softmax -> top-k (-> renormalize) only (router has order={order!r}, "
            f"normalization={normalization!r})")


def _lower(graph: gs.Graph, moe: gs.Node, files: WeightFiles | None) -> str | None:
    """Replace one MoE node; a reason string when it cannot be lowered."""
    router = gu.producer(moe.inputs[1])
    if router is None or router.op != ops.TOPK_ROUTING or gu.producer(moe.inputs[2]) is not router:
        return f"MoE '{moe.name}': weights/ids do not come from one TopKRouting node"
    normalize = contrib_normalize(str(router.attrs.get("order", ops.ORDERS[0])),
                                  str(router.attrs.get("normalization")))
    if isinstance(normalize, str):
        return f"MoE '{moe.name}': {normalize}"
    if "bits" in moe.attrs:
        return f"MoE '{moe.name}': quantized experts are lowered to com.microsoft.QMoE, not MoE"
    gate_up, down = gu.const_array(moe.inputs[3]), gu.const_array(moe.inputs[4])
    if gate_up is None or down is None:
        return f"MoE '{moe.name}': expert weights are not constants"
    fc1 = gu.make_constant(gu.unique_name(graph, f"{moe.inputs[3].name}.ort_fc1"), interleaved_fc1(gate_up), files)
    fc2 = gu.make_constant(gu.unique_name(graph, f"{moe.inputs[4].name}.ort_fc2"), contrib_fc2(down), files)
    empty = gs.Variable.empty()
    node = gs.Node("MoE", f"{moe.name}/ort", contrib_attrs(int(moe.attrs["k"]), normalize),
                   [moe.inputs[0], router.inputs[0], fc1, empty, fc2], list(moe.outputs), domain=MS_DOMAIN)
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
