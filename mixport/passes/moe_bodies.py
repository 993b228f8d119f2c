"""Model-local function bodies for ``mixport::MoE``, made of standard ONNX ops.

``sorted`` (target portable, the default) and ``nonzero`` are sparse: only the selected
experts' rows are multiplied; an expert with no tokens does empty (0-row) MatMuls.
``sorted`` sorts the T*k slots by expert once (TopK), gathers the token rows once and
splits them by the per-expert counts (Split with runtime sizes); ``nonzero`` finds each
expert's slots with its own Equal + NonZero. Both return the k results per token through
the inverse permutation of the expert-major order (TopK of the positions), weight them
and sum over k: no Scatter, so fp32 and fp16 run on ONNX Runtime's CPU kernels. They
time the same on CPU (docs/passes.md); ``sorted`` has half the nodes per expert and one
data-dependent shape instead of E NonZeros, which is what GPU execution providers pay for.

Expert weights: the slab index and the gate/up split are constants, so ONNX Runtime
folds Gather/Slice of the stacked initializers into per-expert initializers at session
creation: no weight bytes are copied per run (tests/passes/test_moe_bodies.py checks
the optimized graph; tools/bench_moe.py times the copies it avoids).

``dense`` (target trt-noplugin): every expert on every token as one batched MatMul
[T,H] @ [E,H,2F], combined by a one-hot weight matrix; no NonZero or Scatter, which
the TensorRT ONNX parser rejects. Exact, but E/k times the work of the sparse bodies.
Legend: T tokens, H hidden, F intermediate, E experts, k active.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from mixport import ops
from mixport.errors import PassError
from mixport.ops import ONNX_OPSET

INPUTS = ["hidden", "weights", "ids", "gate_up", "down"]
ATTRIBUTES = ["num_experts", "k", "activation", "plugin_namespace", "plugin_version"]


def _const(name: str, values: list[int], dims: list[int] | None = None) -> onnx.NodeProto:
    dims = [len(values)] if dims is None else dims
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, dims, values))


def _swiglu_ffn(x: str, gate: str, up: str | None, down: str, s: str) -> list[onnx.NodeProto]:
    """y{s} = (silu(x @ gate) * (x @ up)) @ down; up=None: ``gate`` is [.., H, 2F] gate|up, split after."""
    project = [helper.make_node("MatMul", [x, gate], [f"g{s}"]), helper.make_node("MatMul", [x, up], [f"u{s}"])] \
        if up else [helper.make_node("MatMul", [x, gate], [f"h{s}"]),
                    helper.make_node("Split", [f"h{s}"], [f"g{s}", f"u{s}"], axis=-1, num_outputs=2)]
    return [
        *project,
        helper.make_node("Sigmoid", [f"g{s}"], [f"sg{s}"]),
        helper.make_node("Mul", [f"g{s}", f"sg{s}"], [f"silu{s}"]),
        helper.make_node("Mul", [f"silu{s}", f"u{s}"], [f"a{s}"]),
        helper.make_node("MatMul", [f"a{s}", down], [f"y{s}"]),
    ]


def _slabs(e: int) -> list[onnx.NodeProto]:
    """Expert e's gate [H, F], up [H, F], down [F, H]: constant slices ORT folds at load."""
    s = f"_{e}"
    return [
        _const(f"e{s}", [e], []),
        helper.make_node("Gather", ["gate_up", f"e{s}"], [f"gu{s}"], axis=0),  # [H, 2F]
        helper.make_node("Slice", [f"gu{s}", "zero1", "F", "one"], [f"wg{s}"]),
        helper.make_node("Slice", [f"gu{s}", "F", "F2", "one"], [f"wu{s}"]),
        helper.make_node("Gather", ["down", f"e{s}"], [f"dn{s}"], axis=0),
    ]


def _weighted_sum(ys: str) -> list[onnx.NodeProto]:
    """[T*k, H] in slot order -> sum_j weights[t, j] * y[t, j] -> out [T, H]."""
    return [
        helper.make_node("Shape", ["ids"], ["shape_ids"]),
        helper.make_node("Concat", ["shape_ids", "minus1"], ["shape3"], axis=0),
        helper.make_node("Reshape", [ys, "shape3"], ["y3"]),  # [T, k, H]
        helper.make_node("Unsqueeze", ["weights", "two"], ["w3"]),  # [T, k, 1]
        helper.make_node("Mul", ["y3", "w3"], ["yw"]),
        helper.make_node("ReduceSum", ["yw", "one"], ["out"], keepdims=0),  # [T, H]
    ]


def _sparse_expert(e: int) -> list[onnx.NodeProto]:
    """Expert e on its own tokens -> pos_{e} [n] (flat slot t*k+j), y_{e} [n, H] (unweighted)."""
    s = f"_{e}"
    return [
        *_slabs(e),
        helper.make_node("Equal", ["flat_ids", f"e{s}"], [f"mask{s}"]),
        helper.make_node("NonZero", [f"mask{s}"], [f"nz{s}"]),  # [1, n]
        helper.make_node("Reshape", [f"nz{s}", "minus1"], [f"pos{s}"]),
        helper.make_node("Div", [f"pos{s}", "k"], [f"tok{s}"]),  # int64: token = slot // k
        helper.make_node("Gather", ["hidden", f"tok{s}"], [f"x{s}"], axis=0),  # [n, H]
        *_swiglu_ffn(f"x{s}", f"wg{s}", f"wu{s}", f"dn{s}", s),
    ]


def nonzero_nodes(num_experts: int, k: int, inter: int) -> list[onnx.NodeProto]:
    """Per-expert work on gathered rows; the k results per token come back through the inverse
    permutation of the expert-major slot order (TopK of the slot positions), are weighted and
    summed over k. No Scatter: every float type works in ONNX Runtime's CPU kernels."""
    nodes = [_const("minus1", [-1]), _const("k", [k], []), _const("zero1", [0]), _const("one", [1]),
             _const("two", [2]), _const("F", [inter]), _const("F2", [2 * inter]),
             helper.make_node("Reshape", ["ids", "minus1"], ["flat_ids"])]  # [T*k]
    for e in range(num_experts):
        nodes += _sparse_expert(e)
    experts = range(num_experts)
    return nodes + [
        helper.make_node("Concat", [f"pos_{e}" for e in experts], ["pos"], axis=0),  # [T*k]
        helper.make_node("Concat", [f"y_{e}" for e in experts], ["ys"], axis=0),  # [T*k, H]
        helper.make_node("Shape", ["pos"], ["n_slots"]),
        helper.make_node("TopK", ["pos", "n_slots"], ["sorted_pos", "order"], largest=0, sorted=1),
        helper.make_node("Gather", ["ys", "order"], ["ys_tok"], axis=0),  # token-major [T*k, H]
        *_weighted_sum("ys_tok"),
    ]


def sorted_nodes(num_experts: int, k: int, inter: int) -> list[onnx.NodeProto]:
    """Slots sorted by expert once (TopK), token rows gathered once, split by per-expert counts
    (Split with runtime sizes, zero allowed); per expert only its 3 MatMuls and the activation.
    The results, in expert order, go back to slot order through the inverse permutation."""
    experts = range(num_experts)
    nodes = [_const("minus1", [-1]), _const("k", [k], []), _const("zero1", [0]), _const("one", [1]),
             _const("two", [2]), _const("F", [inter]), _const("F2", [2 * inter]),
             _const("expert_ids", list(experts)), _const("first", [0]),
             helper.make_node("Reshape", ["ids", "minus1"], ["flat_ids"]),  # [T*k]
             helper.make_node("Shape", ["flat_ids"], ["n_slots"]),
             helper.make_node("TopK", ["flat_ids", "n_slots"], ["sorted_ids", "order"], largest=0, sorted=1),
             helper.make_node("Div", ["order", "k"], ["tok_sorted"]),  # slot // k = token
             helper.make_node("Gather", ["hidden", "tok_sorted"], ["x_sorted"], axis=0),  # [T*k, H]
             helper.make_node("Unsqueeze", ["flat_ids", "one"], ["ids_col"]),  # [T*k, 1]
             helper.make_node("Equal", ["ids_col", "expert_ids"], ["hit"]),  # [T*k, E]
             helper.make_node("Cast", ["hit"], ["hit_i"], to=TensorProto.INT64),
             helper.make_node("ReduceSum", ["hit_i", "first"], ["counts"], keepdims=0),  # [E]
             helper.make_node("Split", ["x_sorted", "counts"], [f"x_{e}" for e in experts], axis=0)]
    for e in experts:
        nodes += _slabs(e) + _swiglu_ffn(f"x_{e}", f"wg_{e}", f"wu_{e}", f"dn_{e}", f"_{e}")
    return nodes + [
        helper.make_node("Concat", [f"y_{e}" for e in experts], ["ys"], axis=0),  # [T*k, H] by expert
        helper.make_node("TopK", ["order", "n_slots"], ["slots", "inverse"], largest=0, sorted=1),
        helper.make_node("Gather", ["ys", "inverse"], ["ys_slot"], axis=0),  # slot order
        *_weighted_sum("ys_slot"),
    ]


def dense_nodes(num_experts: int, k: int, inter: int) -> list[onnx.NodeProto]:
    """All experts on all tokens; dense [T,E] routing weights from a one-hot of the ids.
    (k and F come from the inputs' shapes here; the parameters keep BODIES' one signature.)"""
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
        *_swiglu_ffn("hidden", "gate_up", None, "down", ""),  # [E, T, H] via broadcast MatMul
        helper.make_node("Mul", ["y", "scale"], ["yw"]),
        helper.make_node("ReduceSum", ["yw", "first"], ["out"], keepdims=0),
    ]


BODIES = {"sorted": sorted_nodes, "nonzero": nonzero_nodes, "dense": dense_nodes}


def moe_function(body: str, num_experts: int, k: int, inter: int) -> onnx.FunctionProto:
    """The FunctionProto for mixport::MoE: ``body`` (one of BODIES) for E experts, top-k, F."""
    nodes = BODIES[body](num_experts, k, inter)
    return helper.make_function(ops.DOMAIN, ops.MOE, INPUTS, ["out"], nodes,
                                [helper.make_opsetid("", ONNX_OPSET)], attributes=ATTRIBUTES)


def _attr(node: onnx.NodeProto, name: str) -> int | None:
    return next((a.i for a in node.attribute if a.name == name), None)


def attach(model: onnx.ModelProto, body: str) -> int:
    """Replace any MoE function in ``model`` with ``body`` for its E; 1 if attached, 0 if no MoE node."""
    moes = [n for n in model.graph.node if n.domain == ops.DOMAIN and n.op_type == ops.MOE]
    keep = [f for f in model.functions if not (f.domain == ops.DOMAIN and f.name == ops.MOE)]
    del model.functions[:]
    model.functions.extend(keep)
    if not moes:
        return 0
    down_dims = {t.name: t.dims[1] for t in model.graph.initializer if len(t.dims) == 3}
    kinds = {(_attr(n, "num_experts"), _attr(n, "k"), down_dims.get(n.input[4])) for n in moes}
    if len(kinds) != 1 or None in next(iter(kinds)):
        raise PassError("cannot attach one MoE function body: the MoE nodes disagree or lack constant weights",
                        given=f"(num_experts, k, intermediate) = {sorted(map(str, kinds))}",
                        expected="one E, k and F for every MoE node, weights as initializers")
    model.functions.append(moe_function(body, *kinds.pop()))
    if not any(o.domain == ops.DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION))
    return 1
