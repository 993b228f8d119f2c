"""ONNX side of TopKRouting: its op schema, its translation and the one builder of its body."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, defs, helper

from mixport import ops
from mixport.ops import ONNX_OPSET
from mixport.passes.emit import Emitter, Nodes, last

FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def register_schema() -> None:
    """Teach onnx (and so torch's dynamo exporter) the node's signature, once per process."""
    try:
        defs.get_schema(ops.TOPK_ROUTING, ops.OPSET_VERSION, ops.DOMAIN)
        return
    except defs.SchemaError:
        pass
    A = defs.OpSchema.AttrType
    # only what version 1 wrote is required: older files (no order, no version-3 fields) stay valid
    required = {"k", "num_experts", "normalization"}
    attrs = [defs.OpSchema.Attribute(name, kind, "", required=name in required) for name, kind in [
        ("k", A.INT), ("num_experts", A.INT), ("normalization", A.STRING), ("order", A.STRING),
        ("scoring_func", A.STRING), ("n_group", A.INT), ("topk_group", A.INT), ("group_score", A.STRING),
        ("routed_scaling_factor", A.FLOAT), ("sparsemixer_eps", A.FLOAT),
        ("plugin_namespace", A.STRING), ("plugin_version", A.STRING)]]
    optional = defs.OpSchema.FormalParameterOption.Optional
    schema = defs.OpSchema(
        ops.TOPK_ROUTING, ops.DOMAIN, ops.OPSET_VERSION,
        inputs=[defs.OpSchema.FormalParameter("logits", "T"),
                defs.OpSchema.FormalParameter("bias", "B", param_option=optional)],
        outputs=[defs.OpSchema.FormalParameter("weights", "T"),
                 defs.OpSchema.FormalParameter("ids", "tensor(int64)")],
        type_constraints=[("T", FLOAT_TYPES, "router logits and weights"),
                          ("B", FLOAT_TYPES, "the selection-only bias")],
        attributes=attrs)
    defs.register_schema(schema)


def routing_attributes(k: int, num_experts: int, normalization: str,
                       order: str = ops.ORDERS[0], spec: ops.RoutingSpec | None = None) -> dict[str, Any]:
    """The node's attributes (version "3": every field, at its neutral value where unused)."""
    spec = spec or ops.RoutingSpec(k, normalization, order)
    return dict(k=spec.k, num_experts=num_experts, **spec.attributes(),
                plugin_namespace=ops.PLUGIN_NAMESPACE, plugin_version=ops.ROUTING_PLUGIN_VERSION)


def translation(num_experts: int):  # -> callable for custom_translation_table
    """The onnxscript function the dynamo exporter calls for torch.ops.mixport.topk_routing."""
    import onnxscript

    mixport_opset = onnxscript.values.Opset(ops.DOMAIN, ops.OPSET_VERSION)

    def topk_routing(logits, k: int, normalization: str, order: str = ops.ORDERS[0], bias=None,
                     scoring: str = "softmax", n_group: int = 1, topk_group: int = 1, group_score: str = "max",
                     scaling: float = 1.0, eps: float = 0.0):
        spec = ops.RoutingSpec(k, normalization, order, scoring, bias is not None, n_group, topk_group,
                               group_score, scaling, eps)
        inputs = [logits] if bias is None else [logits, bias]
        return mixport_opset.TopKRouting(*inputs, _num_outputs=2,
                                         **routing_attributes(k, num_experts, normalization, order, spec))

    return topk_routing


def routing_nodes(em: Emitter, logits: str, k: int, normalization: str, elem_type: int,
                  outputs: tuple[str, str] | None = None, order: str = ops.ORDERS[0],
                  spec: ops.RoutingSpec | None = None, bias: str | None = None,
                  num_experts: int | None = None) -> tuple[str, str]:
    """TopKRouting from standard ops: Cast fp32 -> Softmax -> TopK -> (renormalize) -> Cast back
    (order ``topk_softmax``: Cast fp32 -> TopK -> Softmax over the k -> (renormalize) -> Cast back;
    ``spec`` (overrides k, normalization, order): sigmoid scores, the selection bias ``bias`` [E],
    grouped top-k, sparsemixer (``num_experts`` needed), x routed_scaling_factor; see ``ops.py``).

    logits [T, E] -> (weights [T, k] of ``elem_type``, ids [T, k] int64); the one builder of
    the routing computation (function body and the fast ONNX Runtime graph alike). Only
    TensorRT-parsable ops (no ScatterElements / NonZero): the body serves trt-noplugin too.
    """
    spec = spec or ops.RoutingSpec(k, normalization, order)
    if num_experts is None and (spec.n_group > 1 or spec.scoring == "sparsemixer"):
        raise ValueError("grouped and sparsemixer routing bodies need num_experts")
    why = spec.problem(num_experts or spec.k)
    if why:
        raise ValueError(why)
    if spec.bias != (bias is not None):
        raise ValueError("the spec's bias flag and the bias input disagree")
    weights_out, ids_out = outputs or (None, em.name("ids"))
    x = em.op1("Cast", [logits], to=TensorProto.FLOAT)  # [T, E] fp32
    if spec.scoring == "sparsemixer":
        top, ids = _sparsemixer(em, x, spec.eps, num_experts or 0, ids_out)
    else:
        top, ids = _select(em, x, spec, bias, ids_out, num_experts or 0)
    if spec.scaling != 1.0:
        top = em.op1("Mul", [top, em.const("scale", np.array(spec.scaling, dtype=np.float32))])
    return last(em, "Cast", [top], weights_out, to=elem_type), ids


def _select(em: Emitter, x: str, spec: ops.RoutingSpec, bias: str | None, ids_out: str,
            num_experts: int) -> tuple[str, str]:
    """Scores -> (biased, group-masked) choice -> TopK -> the unbiased weights -> (renormalize)."""
    if spec.scoring == "sigmoid":
        scores = em.op1("Sigmoid", [x])
    elif spec.order == "softmax_topk":
        scores = em.op1("Softmax", [x], axis=-1)
    else:
        scores = x
    choice = scores if bias is None else em.op1("Add", [scores, em.op1("Cast", [bias], to=TensorProto.FLOAT)])
    if spec.n_group > 1:
        choice = _group_mask(em, choice, spec, num_experts)
    kk = em.const("k", np.array([spec.k], dtype=np.int64))
    top, ids = em.op("TopK", [choice, kk], outputs=[em.name("top"), ids_out], axis=-1, largest=1, sorted=1)
    if choice is not scores:
        top = em.op1("GatherElements", [scores, ids], axis=1)  # the unbiased scores of the experts picked
    if spec.order == "topk_softmax":
        top = em.op1("Softmax", [top], axis=-1)
    if spec.normalization == "renormalize":
        total = em.op1("ReduceSum", [top, em.const("axis", np.array([-1], dtype=np.int64))], keepdims=1)
        if spec.scoring == "sigmoid":
            total = em.op1("Add", [total, em.const("eps", np.array(1e-20, dtype=np.float32))])
        top = em.op1("Div", [top, total])
    return top, ids


def _group_mask(em: Emitter, choice: str, spec: ops.RoutingSpec, num_experts: int) -> str:
    """choice [T, E] -> the same with the experts outside the topk_group best groups at -inf."""
    g = spec.n_group
    shape = np.array([-1, g, num_experts // g], dtype=np.int64)  # -1, not 0: T may be 0
    grouped = em.op1("Reshape", [choice, em.const("shape", shape)])  # [T, G, E/G]
    last_axis = em.const("axis", np.array([-1], dtype=np.int64))
    if spec.group_score == "top2_sum":
        two = em.op("TopK", [grouped, em.const("two", np.array([2], dtype=np.int64))], 2, axis=-1)[0]
        group_scores = em.op1("ReduceSum", [two, last_axis], keepdims=0)  # [T, G]
    else:
        group_scores = em.op1("ReduceMax", [grouped, last_axis], keepdims=0)
    kept = em.op("TopK", [group_scores, em.const("k", np.array([spec.topk_group], dtype=np.int64))], 2,
                 axis=-1)[1]  # [T, topk_group]
    hit = em.op1("Equal", [em.op1("Unsqueeze", [kept, last_axis]),
                           em.const("groups", np.arange(g, dtype=np.int64))])  # [T, topk_group, G]
    keep = em.op1("ReduceMax", [em.op1("Cast", [hit], to=TensorProto.FLOAT),
                                em.const("axis", np.array([1], dtype=np.int64))], keepdims=0)  # [T, G] 0/1
    keep = em.op1("Unsqueeze", [keep, last_axis])  # [T, G, 1]
    masked = em.op1("Where", [em.op1("Greater", [keep, em.const("half", np.array(0.5, dtype=np.float32))]),
                              grouped, em.const("ninf", np.array(-np.inf, dtype=np.float32))])
    return em.op1("Reshape", [masked, em.const("shape", np.array([-1, num_experts], dtype=np.int64))])


def _sparsemixer(em: Emitter, x: str, eps: float, num_experts: int, ids_out: str) -> tuple[str, str]:
    """PhiMoE's two rounds (``ops.py``): x [T, E] fp32 -> weights [T, 2], ids [T, 2]."""
    ninf = em.const("ninf", np.array(-np.inf, dtype=np.float32))
    first, w1 = _sparsemixer_round(em, x, x, eps)
    taken = em.op1("Equal", [em.const("experts", np.arange(num_experts, dtype=np.int64)), first])  # [T, E]
    rest = em.op1("Where", [taken, ninf, x])
    second, w2 = _sparsemixer_round(em, rest, x, eps)
    ids = em.op("Concat", [first, second], outputs=[ids_out], axis=-1)[0]
    return em.op1("Concat", [w1, w2], axis=-1), ids


def _sparsemixer_round(em: Emitter, gates: str, x: str, eps: float) -> tuple[str, str]:
    """One round: (id [T, 1] = argmax of gates (first among equals), its masked softmax weight [T, 1])."""
    top = em.op1("ReduceMax", [gates, em.const("axis", np.array([-1], dtype=np.int64))], keepdims=1)  # [T, 1]
    idx = em.op1("ArgMax", [gates], axis=-1, keepdims=1, select_last_index=0)
    factor = em.op1("Max", [em.op1("Abs", [x]), top])  # |x| clamped below at the max
    far = em.op1("Greater", [em.op1("Div", [em.op1("Sub", [top, x]), factor]),
                             em.const("eps2", np.array(2 * eps, dtype=np.float32))])
    masked = em.op1("Where", [far, em.const("ninf", np.array(-np.inf, dtype=np.float32)), gates])
    weight = em.op1("GatherElements", [em.op1("Softmax", [masked], axis=-1), idx], axis=-1)
    return idx, weight


def routing_function(k: int, normalization: str, elem_type: int, order: str = ops.ORDERS[0],
                     spec: ops.RoutingSpec | None = None, num_experts: int | None = None) -> onnx.FunctionProto:
    """The FunctionProto for mixport::TopKRouting (``routing_nodes``).

    k, the mode and the float type are baked in (one model has one of each), which keeps
    the body free of attribute references that some parsers do not resolve. With a selection
    bias the function takes a second input, ``bias``.
    """
    spec = spec or ops.RoutingSpec(k, normalization, order)
    em = Nodes()
    bias = "bias" if spec.bias else None
    routing_nodes(em, "logits", spec.k, spec.normalization, elem_type, outputs=("weights", "ids"),
                  spec=spec, bias=bias, num_experts=num_experts)
    attrs = routing_attributes(1, 1, "none", spec=spec)
    return helper.make_function(ops.DOMAIN, ops.TOPK_ROUTING, ["logits", "bias"] if bias else ["logits"],
                                ["weights", "ids"], em.nodes, [helper.make_opsetid("", ONNX_OPSET)],
                                attributes=list(attrs))
