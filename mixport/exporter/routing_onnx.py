"""ONNX side of TopKRouting: its op schema, its translation and its function body."""

from __future__ import annotations

from typing import Any

import onnx
from onnx import TensorProto, defs, helper

from mixport import ops
from mixport.ops import ONNX_OPSET

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
        ("k", A.INT), ("num_experts", A.INT), ("normalization", A.STRING),
        ("scoring_func", A.STRING), ("plugin_namespace", A.STRING), ("plugin_version", A.STRING)]]
    schema = defs.OpSchema(
        ops.TOPK_ROUTING, ops.DOMAIN, ops.OPSET_VERSION,
        inputs=[defs.OpSchema.FormalParameter("logits", "T")],
        outputs=[defs.OpSchema.FormalParameter("weights", "T"),
                 defs.OpSchema.FormalParameter("ids", "tensor(int64)")],
        type_constraints=[("T", FLOAT_TYPES, "router logits and weights")],
        attributes=attrs)
    defs.register_schema(schema)


def routing_attributes(k: int, num_experts: int, normalization: str) -> dict[str, Any]:
    return dict(k=k, num_experts=num_experts, normalization=normalization, scoring_func="softmax",
                plugin_namespace=ops.PLUGIN_NAMESPACE, plugin_version=ops.PLUGIN_VERSION)


def translation(num_experts: int):  # -> callable for custom_translation_table
    """The onnxscript function the dynamo exporter calls for torch.ops.mixport.topk_routing."""
    import onnxscript

    mixport_opset = onnxscript.values.Opset(ops.DOMAIN, ops.OPSET_VERSION)

    def topk_routing(logits, k: int, normalization: str):
        return mixport_opset.TopKRouting(logits, _num_outputs=2,
                                         **routing_attributes(k, num_experts, normalization))

    return topk_routing


def routing_function(k: int, normalization: str, elem_type: int) -> onnx.FunctionProto:
    """Body of standard ops: Cast fp32 -> Softmax -> TopK -> (renormalize) -> Cast back.

    k, the mode and the float type are baked in (one model has one of each), which keeps
    the body free of attribute references that some parsers do not resolve.
    """
    nodes = [
        helper.make_node("Cast", ["logits"], ["x32"], to=TensorProto.FLOAT),
        helper.make_node("Softmax", ["x32"], ["probs"], axis=-1),
        helper.make_node("Constant", [], ["kk"], value=helper.make_tensor("kk", TensorProto.INT64, [1], [k])),
        helper.make_node("TopK", ["probs", "kk"], ["top", "ids"], axis=-1, largest=1, sorted=1),
    ]
    last = "top"
    if normalization == "renormalize":
        nodes += [
            helper.make_node("Constant", [], ["ax"], value=helper.make_tensor("ax", TensorProto.INT64, [1], [-1])),
            helper.make_node("ReduceSum", ["top", "ax"], ["denom"], keepdims=1),
            helper.make_node("Div", ["top", "denom"], ["renorm"]),
        ]
        last = "renorm"
    nodes.append(helper.make_node("Cast", [last], ["weights"], to=elem_type))
    return helper.make_function(ops.DOMAIN, ops.TOPK_ROUTING, ["logits"], ["weights", "ids"], nodes,
                                [helper.make_opsetid("", ONNX_OPSET)],
                                attributes=list(routing_attributes(1, 1, "none")))
