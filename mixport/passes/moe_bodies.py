"""Model-local function bodies for ``mixport::MoE``, made of standard ONNX ops.

``sparse`` (target portable, the default): unrolled over the E experts (one model has
one E). Expert e takes only its tokens: NonZero(ids == e) -> Gather rows -> two MatMuls
on its weight slab -> scale -> one ScatterND(add) for all experts at the end. An expert
with no tokens does empty (0-row) MatMuls. The slab index is a constant, so ONNX
Runtime folds Gather(stacked, e) into a per-expert initializer at session creation:
no weight bytes are copied per run (measured, see docs/passes.md).

``dense`` (target trt-noplugin): every expert on every token as one batched MatMul
[T,H] @ [E,H,2F], combined by a one-hot weight matrix; no NonZero or Scatter, which
the TensorRT ONNX parser rejects. Exact, but E/k times the work of the sparse body.
Legend: T tokens, H hidden, F intermediate, E experts, k active.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from mixport import ops
from mixport.exporter.routing_onnx import ONNX_OPSET

INPUTS = ["hidden", "weights", "ids", "gate_up", "down"]
ATTRIBUTES = ["num_experts", "k", "activation", "plugin_namespace", "plugin_version"]


def _const(name: str, values: list[int], dims: list[int] | None = None) -> onnx.NodeProto:
    dims = [len(values)] if dims is None else dims
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, dims, values))


def _swiglu_ffn(x: str, gate_up: str, down: str, s: str) -> list[onnx.NodeProto]:
    """y{s} = (silu(x @ gate) * (x @ up)) @ down, gate|up split from one MatMul."""
    return [
        helper.make_node("MatMul", [x, gate_up], [f"h{s}"]),
        helper.make_node("Split", [f"h{s}"], [f"g{s}", f"u{s}"], axis=-1, num_outputs=2),
        helper.make_node("Sigmoid", [f"g{s}"], [f"sg{s}"]),
        helper.make_node("Mul", [f"g{s}", f"sg{s}"], [f"silu{s}"]),
        helper.make_node("Mul", [f"silu{s}", f"u{s}"], [f"a{s}"]),
        helper.make_node("MatMul", [f"a{s}", down], [f"y{s}"]),
    ]


def _sparse_expert(e: int) -> list[onnx.NodeProto]:
    """Expert e on its own tokens: -> rows{e} [n,1] (token index), yw{e} [n,H] (weighted output)."""
    s = f"_{e}"
    return [
        _const(f"e{s}", [e], []),
        helper.make_node("Equal", ["ids", f"e{s}"], [f"mask{s}"]),
        helper.make_node("NonZero", [f"mask{s}"], [f"nz{s}"]),  # [2, n]: (token, slot)
        helper.make_node("Transpose", [f"nz{s}"], [f"pos{s}"], perm=[1, 0]),
        helper.make_node("Gather", [f"nz{s}", "zero"], [f"tok{s}"], axis=0),
        helper.make_node("GatherND", ["weights", f"pos{s}"], [f"w{s}"]),  # [n]
        helper.make_node("Gather", ["hidden", f"tok{s}"], [f"x{s}"], axis=0),  # [n, H]
        helper.make_node("Gather", ["gate_up", f"e{s}"], [f"gu{s}"], axis=0),  # folded by ORT
        helper.make_node("Gather", ["down", f"e{s}"], [f"dn{s}"], axis=0),
        *_swiglu_ffn(f"x{s}", f"gu{s}", f"dn{s}", s),
        helper.make_node("Unsqueeze", [f"w{s}", "one"], [f"wc{s}"]),
        helper.make_node("Mul", [f"y{s}", f"wc{s}"], [f"yw{s}"]),
        helper.make_node("Unsqueeze", [f"tok{s}", "one"], [f"rows{s}"]),
    ]


def sparse_nodes(num_experts: int, elem_type: int) -> list[onnx.NodeProto]:
    """ScatterND(add) sums in the model's type for fp32; fp16/bf16 sum in fp32 (ORT's CPU
    ScatterND has no fp16 add) and round once at the end, as the exported Add chain does for k=2."""
    wide = elem_type != TensorProto.FLOAT
    nodes = [_const("zero", [0], []), _const("one", [1]),
             helper.make_node("Constant", [], ["zero_f"], value_float=0.0),
             helper.make_node("Shape", ["hidden"], ["shape_h"]),
             helper.make_node("Expand", ["zero_f", "shape_h"], ["acc0"])]  # fp32 [T, H]
    for e in range(num_experts):
        nodes += _sparse_expert(e)
    nodes += [
        helper.make_node("Concat", [f"rows_{e}" for e in range(num_experts)], ["rows"], axis=0),
        helper.make_node("Concat", [f"yw_{e}" for e in range(num_experts)], ["ys_t" if wide else "ys"], axis=0),
    ]
    if wide:
        nodes.append(helper.make_node("Cast", ["ys_t"], ["ys"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("ScatterND", ["acc0", "rows", "ys"], ["out_f" if wide else "out"],
                                  reduction="add"))
    if wide:
        nodes.append(helper.make_node("Cast", ["out_f"], ["out"], to=elem_type))
    return nodes


def dense_nodes(num_experts: int, elem_type: int) -> list[onnx.NodeProto]:
    """All experts on all tokens; dense [T,E] routing weights from a one-hot of the ids."""
    return [
        _const("experts", list(range(num_experts))), _const("two", [2]), _const("first", [0]),
        _const("slots", [1]),
        helper.make_node("Unsqueeze", ["ids", "two"], ["ids3"]),  # [T, k, 1]
        helper.make_node("Equal", ["ids3", "experts"], ["onehot"]),  # [T, k, E]
        helper.make_node("CastLike", ["onehot", "weights"], ["onehot_f"]),
        helper.make_node("Unsqueeze", ["weights", "two"], ["weights3"]),
        helper.make_node("Mul", ["onehot_f", "weights3"], ["spread"]),
        helper.make_node("ReduceSum", ["spread", "slots"], ["dense_w"], keepdims=0),  # [T, E]
        helper.make_node("Transpose", ["dense_w"], ["dense_wt"], perm=[1, 0]),
        helper.make_node("Unsqueeze", ["dense_wt", "two"], ["scale"]),  # [E, T, 1]
        *_swiglu_ffn("hidden", "gate_up", "down", ""),  # [E, T, H] via broadcast MatMul
        helper.make_node("Mul", ["y", "scale"], ["yw"]),
        helper.make_node("ReduceSum", ["yw", "first"], ["out"], keepdims=0),
    ]


BODIES = {"sparse": sparse_nodes, "dense": dense_nodes}


def moe_function(body: str, num_experts: int, elem_type: int) -> onnx.FunctionProto:
    """The FunctionProto for mixport::MoE with ``body`` ("sparse" | "dense"), E experts, one float type."""
    nodes = BODIES[body](num_experts, elem_type)
    return helper.make_function(ops.DOMAIN, ops.MOE, INPUTS, ["out"], nodes,
                                [helper.make_opsetid("", ONNX_OPSET)], attributes=ATTRIBUTES)


def attach(model: onnx.ModelProto, body: str) -> int:
    """Replace any MoE function in ``model`` with ``body`` for its E; 1 if attached, 0 if no MoE node."""
    moes = [n for n in model.graph.node if n.domain == ops.DOMAIN and n.op_type == ops.MOE]
    keep = [f for f in model.functions if not (f.domain == ops.DOMAIN and f.name == ops.MOE)]
    del model.functions[:]
    model.functions.extend(keep)
    if not moes:
        return 0
    types = {t.name: t.data_type for t in model.graph.initializer}
    kinds = {(next(a.i for a in n.attribute if a.name == "num_experts"), types.get(n.input[3])) for n in moes}
    if len(kinds) != 1 or None in next(iter(kinds)):
        raise ValueError(f"MoE nodes disagree on (num_experts, weight type) or lack weights: {sorted(kinds)}")
    model.functions.append(moe_function(body, *kinds.pop()))
    if not any(o.domain == ops.DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION))
    return 1
