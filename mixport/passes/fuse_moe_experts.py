"""fuse_moe_experts: TopKRouting + its per-expert SwiGLU FFNs -> ONE ``mixport::MoE`` node.

The exported (dense) pattern per layer, for every expert e (see ``Experts._dense``)::

    w_e  = ReduceSum(weights * Cast(Equal(ids, e)), -1, keepdims)   # [T, 1] (maybe Cast-wrapped)
    y_e  = W2_e( silu(W1_e(x)) * W3_e(x) )                           # Gemm / MatMul (+Transpose)
    acc  = acc + y_e * w_e                                           # Add chain, from zeros

GPT-OSS's experts (``models/gpt_oss_layers.ClampedExpert``) add a bias after each projection
(MatMul + Add of a constant, or Gemm with a bias) and replace silu(g) * u by the clamped SwiGLU
(Clip(u, -L, L) + 1) * (c * Sigmoid(c * alpha)), c = Clip(g, max=L) (fp16 / bf16 exports: Min / Max and
Cast-wrapped constants instead): the node then carries the
stacked biases, activation "swiglu_clamped", alpha and limit (plugin_version "3", ops.py).

Matched by structure from each TopKRouting node; initializer names are never needed.
The rewrite stacks the weights ([E,H,2F] gate|up and [E,F,H] down, ops.py layout),
re-points the chain's last output at the new node and leaves the rest to cleanup.
Legend: T tokens, H hidden, F intermediate, E experts, k active.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from mixport import ops
from mixport.errors import NoMatch
from mixport.onnx_io import WeightFiles
from mixport.passes import graph_utils as gu

NAME = "fuse_moe_experts"


@dataclass(frozen=True)
class Weight:
    """A linear layer's constant weight as [in, out], read only when ``load()`` is called (a memory
    map of the file when the graph's weights are in files): the layer's experts are matched
    without reading them, then stacked one expert at a time."""

    tensor: gs.Tensor
    transposed: bool
    shape: tuple[int, ...]  # [in, out]

    def load(self) -> np.ndarray:
        arr = gu.const_array(self.tensor)
        assert arr is not None  # matched as a constant
        return arr.T if self.transposed else arr


@dataclass(frozen=True)
class Activation:
    """What the expert applies between its projections: ``swiglu`` or ``swiglu_clamped`` (alpha, limit)."""

    kind: str = "swiglu"
    alpha: float = ops.SWIGLU_ALPHA
    limit: float = ops.SWIGLU_LIMIT


@dataclass
class ExpertFFN:
    index: int
    x: gs.Tensor
    w1: Weight  # [H, F]  (gate, row-major [in, out])
    w3: Weight  # [H, F]  (up)
    w2: Weight  # [F, H]  (down)
    scaled: gs.Tensor  # y_e * w_e, the Add chain's operand
    hint: str  # a weight's initializer name, for naming the stacked ones
    biases: tuple[gs.Tensor | None, gs.Tensor | None, gs.Tensor | None] = (None, None, None)  # gate, up, down
    activation: Activation = Activation()

    @property
    def extended(self) -> bool:
        """Needs the version-"3" node (biases or the clamped activation)."""
        return any(b is not None for b in self.biases) or self.activation.kind != "swiglu"


def apply(graph: gs.Graph, reasons: list[str] | None = None, files: WeightFiles | None = None) -> int:
    """Fuse every routed expert block; return how many MoE nodes were made. With ``files``, each
    layer's stacked weights are written to their work file as soon as it is fused."""
    reasons = reasons if reasons is not None else []
    routers = gu.mixport_nodes(graph, ops.TOPK_ROUTING)
    if not routers:
        reasons.append(f"{NAME}: no {ops.DOMAIN}::{ops.TOPK_ROUTING} node in the graph")
    fused = 0
    for router in routers:
        if any(u.domain == ops.DOMAIN and u.op == ops.MOE for u in router.outputs[1].outputs):
            reasons.append(f"{NAME}: router '{router.name}' already feeds a {ops.MOE} node")
            continue
        try:
            _fuse_layer(graph, router, files)
            fused += 1
        except NoMatch as why:
            reasons.append(f"{NAME}: router '{router.name}': {why}")
    if fused:
        graph.cleanup().toposort()
    return fused


def _fuse_layer(graph: gs.Graph, router: gs.Node, files: WeightFiles | None) -> None:
    weights, ids = router.outputs[0], router.outputs[1]
    num_experts, k = int(router.attrs.get("num_experts", 0)), int(router.attrs.get("k", 0))
    experts = [_expert(eq, weights) for eq in ids.outputs if eq.op == "Equal"]
    if not experts:
        raise NoMatch("its expert ids feed no Equal(ids, e) routing-weight extraction")
    found = sorted(e.index for e in experts)
    if found != list(range(num_experts)):
        raise NoMatch(f"expert indices {found} do not cover 0..{num_experts - 1} exactly once")
    x = experts[0].x
    if any(e.x is not x for e in experts):
        raise NoMatch("the experts read different input tensors")
    if x.shape is not None and len(x.shape) != 2:
        raise NoMatch(f"the experts' input '{x.name}' has rank {len(x.shape)}, the MoE op takes [T, H]")
    kinds = {(e.extended, e.activation) for e in experts}
    if len(kinds) != 1:
        raise NoMatch(f"the experts differ in biases or activation: {sorted(map(str, kinds))}")
    start, last = _add_chain([e.scaled for e in experts])
    experts.sort(key=lambda e: e.index)
    gate_up, down = _stacked(graph, experts, files)
    out = last.outputs[0]
    last.outputs.clear()
    attrs = dict(num_experts=num_experts, k=k, activation="swiglu",
                 plugin_namespace=ops.PLUGIN_NAMESPACE, plugin_version=ops.PLUGIN_VERSION)
    inputs = [x, weights, ids, gate_up, down]
    if experts[0].extended:
        act = experts[0].activation
        attrs.update(activation=act.kind, alpha=act.alpha, limit=act.limit, plugin_version=ops.BIAS_PLUGIN_VERSION)
        inputs += _stacked_biases(graph, experts, files, gate_up.name.removesuffix(".gate_up"))
    name = gu.unique_name(graph, f"{router.name or 'router'}/MoE")
    if start is None or gu.is_zero(start):
        graph.nodes.append(gs.Node(ops.MOE, name, attrs, inputs, [out], domain=ops.DOMAIN))
        return
    moe_out = gs.Variable(gu.unique_name(graph, f"{name}_out"), dtype=out.dtype, shape=out.shape)
    graph.nodes.append(gs.Node(ops.MOE, name, attrs, inputs, [moe_out], domain=ops.DOMAIN))
    graph.nodes.append(gs.Node("Add", f"{name}/residual", inputs=[start, moe_out], outputs=[out]))


def _only(tensor: gs.Tensor, op: str, what: str) -> gs.Node:
    """The single consumer of ``tensor``, which must be ``op``."""
    users = tensor.outputs
    if len(users) != 1 or users[0].op != op:
        raise NoMatch(f"{what}: expected one {op} consumer, found {[u.op for u in users]}")
    return users[0]


def _skip_cast(tensor: gs.Tensor) -> gs.Tensor:
    """Follow a lone Cast consumer (bf16/fp16 exports reduce in fp32 and cast back)."""
    users = tensor.outputs
    return users[0].outputs[0] if len(users) == 1 and users[0].op == "Cast" else tensor


def _route_weight(eq: gs.Node, weights: gs.Tensor) -> tuple[int, gs.Tensor]:
    """Equal(ids, e) -> Cast -> Mul(weights) -> [Cast] -> ReduceSum(-1) -> [Cast]: (e, w_e)."""
    e = gu.const_int(eq.inputs[1])
    if e is None:
        raise NoMatch(f"Equal node '{eq.name}' does not compare the ids with a constant expert index")
    cast = _only(eq.outputs[0], "Cast", f"expert {e} mask")
    mul = _only(cast.outputs[0], "Mul", f"expert {e} mask")
    if weights not in mul.inputs:
        raise NoMatch(f"expert {e}: the mask is not multiplied with the routing weights")
    red = _only(_skip_cast(mul.outputs[0]), "ReduceSum", f"expert {e} masked weights")
    axes = gu.const_array(red.inputs[1]) if len(red.inputs) > 1 else red.attrs.get("axes")
    if axes is None or [int(a) for a in np.ravel(axes)] not in ([-1], [1]) or not red.attrs.get("keepdims", 1):
        raise NoMatch(f"expert {e}: routing weights are not summed over the last axis with keepdims")
    return e, _skip_cast(red.outputs[0])


def _expert(eq: gs.Node, weights: gs.Tensor) -> ExpertFFN:
    e, w_e = _route_weight(eq, weights)
    scales = [n for n in w_e.outputs if n.op == "Mul"]
    if len(scales) != 1 or len(w_e.outputs) != 1:
        raise NoMatch(f"expert {e}: its routing weight should feed exactly one Mul")
    scale = scales[0]
    y = scale.inputs[1] if scale.inputs[0] is w_e else scale.inputs[0]
    act, w2, hint, b2 = _biased_linear(y, f"expert {e} down projection")
    try:
        gate, up = _swiglu(act, e)
        activation = Activation()
    except NoMatch as plain:
        found = _clamped_swiglu(act)
        if found is None:
            raise plain from None
        gate, up, activation = found
    x1, w1, _, b1 = _biased_linear(gate, f"expert {e} gate projection")
    x3, w3, _, b3 = _biased_linear(up, f"expert {e} up projection")
    if x1 is not x3:
        raise NoMatch(f"expert {e}: gate and up projections read different inputs")
    if w1.shape != w3.shape or w2.shape != w1.shape[::-1]:
        raise NoMatch(f"expert {e}: weight shapes {w1.shape}, {w3.shape}, {w2.shape} are not SwiGLU's")
    return ExpertFFN(e, x1, w1, w3, w2, scale.outputs[0], hint, (b1, b3, b2), activation)


def _swiglu(act: gs.Tensor, e: int) -> tuple[gs.Tensor, gs.Tensor]:
    """act = Mul(silu(g), u) with silu(g) = Mul(g, Sigmoid(g)): return (g, u)."""
    mul = gu.producer_op(act, "Mul")
    if mul is None:
        raise NoMatch(f"expert {e}: the down projection's input is not a Mul (silu(gate) * up)")
    for silu, up in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
        inner = gu.producer_op(silu, "Mul")
        if inner is None:
            continue
        for g, s in ((inner.inputs[0], inner.inputs[1]), (inner.inputs[1], inner.inputs[0])):
            sig = gu.producer_op(s, "Sigmoid")
            if sig is not None and sig.inputs[0] is g:
                return g, up
    raise NoMatch(f"expert {e}: no silu(gate) = gate * Sigmoid(gate) (nor GPT-OSS's clamped SwiGLU) found "
                  "before the down projection")


def _clamped_swiglu(act: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor, Activation] | None:
    """act = Mul(Add(Clip(u, -L, L), 1), Mul(c, Sigmoid(Mul(c, alpha)))), c = Clip(g, max=L):
    (g, u, the activation), or None."""
    mul = gu.producer_op(act, "Mul")
    for plus, glu in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])) if mul else ():
        add, inner = gu.producer_op(plus, "Add"), gu.producer_op(glu, "Mul")
        ones = [] if add is None else [i for i, t in enumerate(add.inputs) if _scalar(t) == 1.0]
        if inner is None or len(ones) != 1:
            continue
        up = _clip(add.inputs[1 - ones[0]])
        for c, s in ((inner.inputs[0], inner.inputs[1]), (inner.inputs[1], inner.inputs[0])):
            sig = gu.producer_op(s, "Sigmoid")
            scaled = None if sig is None else gu.producer_op(sig.inputs[0], "Mul")
            gate = _clip(c)
            if scaled is None or c not in scaled.inputs or up is None or gate is None:
                continue
            alpha = _scalar(scaled.inputs[1] if scaled.inputs[0] is c else scaled.inputs[0])
            limit = up[2]
            if alpha is not None and limit is not None and up[1] == -limit and gate[1] is None and gate[2] == limit:
                return gate[0], up[0], Activation("swiglu_clamped", alpha, limit)
    return None


def _clip(t: gs.Tensor) -> tuple[gs.Tensor, float | None, float | None] | None:
    """t = Clip(x, lo, hi) with constant (or absent) bounds, or the fp16/bf16 exports' Min(x, hi) and
    Min(Max(x, lo), hi): (x, lo, hi), else None."""
    node = gu.producer_op(t, "Clip", "Min", "Max")
    if node is None:
        return None
    if node.op == "Clip":
        bounds = [_scalar(b) if b.name else None for b in node.inputs[1:3]] + [None] * (3 - len(node.inputs))
        return node.inputs[0], bounds[0], bounds[1]
    if len(node.inputs) != 2:
        return None
    bound = [_scalar(i) for i in node.inputs]
    if (bound[0] is None) == (bound[1] is None):
        return None
    x, value = (node.inputs[0], bound[1]) if bound[1] is not None else (node.inputs[1], bound[0])
    inner = _clip(x) if gu.producer_op(x, "Min" if node.op == "Max" else "Max") else None
    lo, hi = (value, None) if node.op == "Max" else (None, value)
    if inner is None:
        return x, lo, hi
    return inner[0], lo if lo is not None else inner[1], hi if hi is not None else inner[2]


def _scalar(t: gs.Tensor) -> float | None:
    """A constant one-value tensor's value, through Casts / CastLikes (the exporter's scalars)."""
    arr = gu.const_array(t)
    if arr is None:
        node = gu.producer(t)
        if node is None or node.op not in ("Cast", "CastLike"):
            return None
        return _scalar(node.inputs[0])
    return float(np.ravel(arr)[0]) if arr.size == 1 else None


def _biased_linear(y: gs.Tensor, what: str) -> tuple[gs.Tensor, Weight, str, gs.Tensor | None]:
    """y = x @ W, or x @ W + b with b a constant vector [out] (Add, or a Gemm's bias): (x, W, name, b)."""
    add = gu.producer_op(y, "Add")
    if add is not None:
        for mm, b in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            arr = gu.const_array(b)
            if arr is not None and arr.ndim == 1 and gu.producer_op(mm, "Gemm", "MatMul") is not None:
                x, w, name = _linear(mm, what)
                if arr.shape[0] != w.shape[1]:
                    raise NoMatch(f"{what}: bias of {arr.shape[0]} values for {w.shape[1]} outputs")
                return x, w, name, b
    node = gu.producer_op(y, "Gemm")
    bias = node.inputs[2] if node is not None and len(node.inputs) > 2 else None
    if bias is not None and not gu.is_zero(bias) and gu.const_array(bias) is not None:
        node.inputs.pop()  # matched as y = x @ W + b: the rest of the Gemm is checked as a plain one
        try:
            x, w, name = _linear(y, what)
        finally:
            node.inputs.append(bias)
        return x, w, name, bias
    return (*_linear(y, what), None)


def _linear(y: gs.Tensor, what: str) -> tuple[gs.Tensor, Weight, str]:
    """y = x @ W (Gemm with transB or not, MatMul, MatMul of a Transpose): (x, W as [in, out], name)."""
    node = gu.producer_op(y, "Gemm", "MatMul")
    if node is None:
        raise NoMatch(f"{what}: {y.name} is not made by Gemm or MatMul")
    x, w = node.inputs[0], node.inputs[1]
    if node.op == "Gemm":
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0 \
                or (bias is not None and not gu.is_zero(bias)):
            raise NoMatch(f"{what}: Gemm '{node.name}' has transA, alpha != 1 or a bias")
        transposed = bool(node.attrs.get("transB", 0))
    else:
        transposed = False
        tr = gu.producer_op(w, "Transpose")
        if tr is not None and list(tr.attrs.get("perm", [1, 0])) == [1, 0]:
            w, transposed = tr.inputs[0], True
    arr = gu.const_array(w)  # a memory map of file-backed weights: nothing read
    if arr is None or arr.ndim != 2:
        raise NoMatch(f"{what}: the weight of '{node.name}' is not a constant 2-D tensor")
    return x, Weight(w, transposed, arr.shape[::-1] if transposed else arr.shape), w.name


def _add_chain(scaled: list[gs.Tensor]) -> tuple[gs.Tensor | None, gs.Node]:
    """The Add chain summing the scaled expert outputs: (its start tensor or None, its last Add)."""
    adds: dict[int, gs.Node] = {}
    for t in scaled:
        add = _only(t, "Add", f"scaled expert output {t.name}")
        adds[id(add)] = add
    if len(adds) != len(scaled):
        raise NoMatch("two expert outputs meet in one Add; expected a running sum")
    chain_outputs = {id(a.outputs[0]) for a in adds.values()}
    scaled_ids = {id(t) for t in scaled}
    starts, lasts = [], []
    for add in adds.values():
        others = [t for t in add.inputs if id(t) not in scaled_ids]
        if len(others) > 1:
            raise NoMatch(f"Add '{add.name}' adds no expert output")
        prev = others[0] if others else None
        if prev is None or id(prev) not in chain_outputs:
            starts.append(prev)
        elif len(prev.outputs) != 1:
            raise NoMatch("a partial expert sum is used outside the running sum")
        if not any(id(u) in adds for u in add.outputs[0].outputs):
            lasts.append(add)
    if len(starts) != 1 or len(lasts) != 1:
        raise NoMatch(f"the expert outputs are not summed by one Add chain ({len(starts)} starts)")
    return starts[0], lasts[0]


def _stacked(graph: gs.Graph, experts: list[ExpertFFN], files: WeightFiles | None
             ) -> tuple[gs.Constant, gs.Constant]:
    """[E, H, 2F] (gate | up) and [E, F, H] (down), named after the experts' common prefix. With
    ``files`` each is written an expert at a time: memory holds one expert's slab, not the layer."""
    prefix = os.path.commonprefix([e.hint for e in experts]).rstrip(".0123456789")
    base = prefix if len(prefix) >= 3 else "moe"
    gate_up = (_gate_up(e) for e in experts)  # [H, 2F] each
    down = (np.ascontiguousarray(e.w2.load()) for e in experts)  # [F, H] each
    return (gu.stacked_constant(gu.unique_name(graph, f"{base}.gate_up"), gate_up, len(experts), files),
            gu.stacked_constant(gu.unique_name(graph, f"{base}.down"), down, len(experts), files))


def _stacked_biases(graph: gs.Graph, experts: list[ExpertFFN], files: WeightFiles | None, base: str
                    ) -> list[gs.Constant]:
    """[E, 2F] (gate | up) and [E, H] (down) biases; zeros for a projection without one."""
    dtype = gu.const_array(experts[0].w2.tensor).dtype

    def bias(t: gs.Tensor | None, n: int) -> np.ndarray:
        return np.zeros(n, dtype) if t is None else np.asarray(gu.const_array(t)).astype(dtype)

    f, h = experts[0].w1.shape[1], experts[0].w2.shape[1]
    gate_up = (np.concatenate([bias(e.biases[0], f), bias(e.biases[1], f)]) for e in experts)
    down = (bias(e.biases[2], h) for e in experts)
    return [gu.stacked_constant(gu.unique_name(graph, f"{base}.gate_up_bias"), gate_up, len(experts), files),
            gu.stacked_constant(gu.unique_name(graph, f"{base}.down_bias"), down, len(experts), files)]


def _gate_up(expert: ExpertFFN) -> np.ndarray:
    """[H, 2F] = gate | up, row-major (np.concatenate of transposed weights would come out
    column-major: one more copy to write it)."""
    w1, w3 = expert.w1.load(), expert.w3.load()
    out = np.empty((w1.shape[0], w1.shape[1] + w3.shape[1]), np.result_type(w1, w3))
    out[:, :w1.shape[1]], out[:, w1.shape[1]:] = w1, w3
    return out
