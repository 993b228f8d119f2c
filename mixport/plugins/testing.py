"""A tiny seeded ONNX graph that exercises both mixport nodes (tests and self-checks).

    hidden [T, H] -> MatMul router -> mixport::TopKRouting -> mixport::MoE -> out [T, H]

Both nodes carry ``plugin_namespace``/``plugin_version`` and a model-local dense
function body of standard ops (softmax/top-k/renormalize; one-hot combine
weights + einsum over all experts), so the file runs with or without plugins.
T tokens (dynamic), H hidden, F expert FFN width, E experts, k active.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mixport.ops import (
    DOMAIN,
    MOE,
    OPSET_VERSION,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    TOPK_ROUTING,
)

ONNX_OPSET = 18
_PLUGIN_ATTRS = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}


def _constant_from_attr(out: str, attr: str) -> Any:
    from onnx import AttributeProto, NodeProto

    node = NodeProto(op_type="Constant", output=[out])
    ref = node.attribute.add()
    ref.name, ref.ref_attr_name, ref.type = "value_int", attr, AttributeProto.INT
    return node


def routing_function() -> Any:
    """Dense body of ``TopKRouting`` (renormalize mode): fp32 softmax -> top-k -> divide by sum."""
    from onnx import TensorProto, helper

    n = helper.make_node
    nodes = [
        _constant_from_attr("k0", "k"),
        n("Constant", [], ["axis0"], value_ints=[0]),
        n("Constant", [], ["last"], value_ints=[-1]),
        n("Unsqueeze", ["k0", "axis0"], ["k1"]),
        n("Cast", ["logits"], ["logits32"], to=TensorProto.FLOAT),
        n("Softmax", ["logits32"], ["probs"], axis=-1),
        n("TopK", ["probs", "k1"], ["top", "ids"], axis=-1),
        n("ReduceSum", ["top", "last"], ["total"], keepdims=1),
        n("Div", ["top", "total"], ["w32"]),
        n("CastLike", ["w32", "logits"], ["weights"]),
    ]
    return helper.make_function(
        DOMAIN, TOPK_ROUTING, ["logits"], ["weights", "ids"], nodes,
        [helper.make_opsetid("", ONNX_OPSET)],
        attributes=["k", "num_experts", "scoring_func", "normalization"])


def moe_function() -> Any:
    """Dense body of ``MoE``: every expert on every token, combined by one-hot weights."""
    from onnx import helper

    n = helper.make_node
    nodes = [
        _constant_from_attr("depth", "num_experts"),
        n("Constant", [], ["axis1"], value_ints=[1]),
        n("Constant", [], ["last"], value_ints=[-1]),
        n("Constant", [], ["off_on"], value_floats=[0.0, 1.0]),
        n("CastLike", ["off_on", "hidden"], ["values"]),
        n("OneHot", ["ids", "depth", "values"], ["onehot"], axis=-1),  # [T, k, E]
        n("Unsqueeze", ["weights", "last"], ["w3"]),  # [T, k, 1]
        n("Mul", ["onehot", "w3"], ["weighted"]),
        n("ReduceSum", ["weighted", "axis1"], ["combine"], keepdims=0),  # [T, E]
        n("Einsum", ["hidden", "gate_up"], ["gu"], equation="th,ehf->etf"),
        n("Split", ["gu"], ["gate", "up"], axis=-1, num_outputs=2),
        n("Sigmoid", ["gate"], ["sig"]),
        n("Mul", ["gate", "sig"], ["silu"]),
        n("Mul", ["silu", "up"], ["act"]),  # [E, T, F]
        n("Einsum", ["act", "down"], ["y"], equation="etf,efh->eth"),
        n("Einsum", ["y", "combine"], ["out"], equation="eth,te->th"),
    ]
    return helper.make_function(
        DOMAIN, MOE, ["hidden", "weights", "ids", "gate_up", "down"], ["out"], nodes,
        [helper.make_opsetid("", ONNX_OPSET)], attributes=["num_experts", "k", "activation"])


def _float_io(name: str, dim: int) -> Any:
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["T", dim])


def tiny_moe_model(hidden: int = 32, ffn: int = 48, experts: int = 4, k: int = 2,
                   seed: int = 0, plugin_attrs: bool = True) -> Any:
    """The tiny router + TopKRouting + MoE model (fp32, dynamic T) as a ModelProto."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)
             for name, shape in (("router", (hidden, experts)),
                                 ("gate_up", (experts, hidden, 2 * ffn)),
                                 ("down", (experts, ffn, hidden)))]
    extra = _PLUGIN_ATTRS if plugin_attrs else {}
    nodes = [
        helper.make_node("MatMul", ["hidden", "router"], ["logits"], name="router"),
        helper.make_node(TOPK_ROUTING, ["logits"], ["weights", "ids"], name="routing",
                         domain=DOMAIN, k=k, num_experts=experts, scoring_func="softmax",
                         normalization="renormalize", **extra),
        helper.make_node(MOE, ["hidden", "weights", "ids", "gate_up", "down"], ["out"],
                         name="moe", domain=DOMAIN, num_experts=experts, k=k,
                         activation="swiglu", **extra),
    ]
    graph = helper.make_graph(
        nodes, "tiny_moe", [_float_io("hidden", hidden)],
        [_float_io("out", hidden), _float_io("weights", k),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["T", k])], inits)
    model = helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(DOMAIN, OPSET_VERSION)],
        functions=[routing_function(), moe_function()])
    model.ir_version = 10
    return model


def write_tiny_moe_model(path: str | Path, **kwargs: Any) -> Path:
    """Save ``tiny_moe_model(**kwargs)`` to ``path`` and return it."""
    import onnx

    onnx.save(tiny_moe_model(**kwargs), str(path))
    return Path(path)
