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
    attrs = [defs.OpSchema.Attribute(name, kind, "") for name, kind in [
        ("k", A.INT), ("num_experts", A.INT), ("normalization", A.STRING), ("order", A.STRING),
        ("scoring_func", A.STRING), ("plugin_namespace", A.STRING), ("plugin_version", A.STRING)]]
    schema = defs.OpSchema(
        ops.TOPK_ROUTING, ops.DOMAIN, ops.OPSET_VERSION,
        inputs=[defs.OpSchema.FormalParameter("logits", "T")],
        outputs=[defs.OpSchema.FormalParameter("weights", "T"),
                 defs.OpSchema.FormalParameter("ids", "tensor(int64)")],
        type_constraints=[("T", FLOAT_TYPES, "router logits and weights")],
        attributes=attrs)
    defs.register_schema(schema)


def routing_attributes(k: int, num_experts: int, normalization: str,
                       order: str = ops.ORDERS[0]) -> dict[str, Any]:
    return dict(k=k, num_experts=num_experts, normalization=normalization, order=order, scoring_func="softmax",
                plugin_namespace=ops.PLUGIN_NAMESPACE, plugin_version=ops.ROUTING_PLUGIN_VERSION)


def translation(num_experts: int):  # -> callable for custom_translation_table
    """The onnxscript function the dynamo exporter calls for torch.ops.mixport.topk_routing."""
    import onnxscript

    mixport_opset = onnxscript.values.Opset(ops.DOMAIN, ops.OPSET_VERSION)

    def topk_routing(logits, k: int, normalization: str, order: str = ops.ORDERS[0]):
        return mixport_opset.TopKRouting(logits, _num_outputs=2,
                                         **routing_attributes(k, num_experts, normalization, order))

    return topk_routing


def routing_nodes(em: Emitter, logits: str, k: int, normalization: str, elem_type: int,
                  outputs: tuple[str, str] | None = None, order: str = ops.ORDERS[0]) -> tuple[str, str]:
    """TopKRouting from standard ops: Cast fp32 -> Softmax -> TopK -> (renormalize) -> Cast back
    (order ``topk_softmax``: Cast fp32 -> TopK -> Softmax over the k -> (renormalize) -> Cast back).

    logits [T, E] -> (weights [T, k] of ``elem_type``, ids [T, k] int64); the one builder of
    the routing computation (function body and the fast ONNX Runtime graph alike).
    """
    if normalization not in ops.NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {ops.NORMALIZATIONS}, got {normalization!r}")
    if order not in ops.ORDERS:
        raise ValueError(f"order must be one of {ops.ORDERS}, got {order!r}")
    weights_out, ids_out = outputs or (None, em.name("ids"))
    scores = em.op1("Cast", [logits], to=TensorProto.FLOAT)  # [T, E] fp32
    if order == "softmax_topk":
        scores = em.op1("Softmax", [scores], axis=-1)
    kk = em.const("k", np.array([k], dtype=np.int64))
    top, ids = em.op("TopK", [scores, kk], outputs=[em.name("top"), ids_out], axis=-1, largest=1, sorted=1)
    if order == "topk_softmax":
        top = em.op1("Softmax", [top], axis=-1)
    if normalization == "renormalize":
        total = em.op1("ReduceSum", [top, em.const("axis", np.array([-1], dtype=np.int64))], keepdims=1)
        top = em.op1("Div", [top, total])
    return last(em, "Cast", [top], weights_out, to=elem_type), ids


def routing_function(k: int, normalization: str, elem_type: int, order: str = ops.ORDERS[0]) -> onnx.FunctionProto:
    """The FunctionProto for mixport::TopKRouting (``routing_nodes``).

    k, the mode and the float type are baked in (one model has one of each), which keeps
    the body free of attribute references that some parsers do not resolve.
    """
    em = Nodes()
    routing_nodes(em, "logits", k, normalization, elem_type, outputs=("weights", "ids"), order=order)
    return helper.make_function(ops.DOMAIN, ops.TOPK_ROUTING, ["logits"], ["weights", "ids"], em.nodes,
                                [helper.make_opsetid("", ONNX_OPSET)],
                                attributes=list(routing_attributes(1, 1, "none")))
