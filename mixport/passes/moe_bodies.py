"""The builders of ``mixport::MoE``'s computation from standard ONNX ops: one per variant.

Every ONNX form of the MoE contract (``ops.py``) is written here, through an ``Emitter``
(``passes/emit.py``): the model-local function bodies below (``BODIES``, chosen by the
pipeline's target) and the sparse experts of the fast ONNX Runtime graph
(``runtime/ort_graph.py``, variant ``ORT_CPU``). tests/passes/test_moe_bodies.py checks each
variant against the float64 numpy oracle (``plugins/kernels/reference.py``).

``sorted`` (target portable, the default) and ``nonzero`` are sparse: only the selected
experts' rows are multiplied; an expert with no tokens does empty (0-row) MatMuls.
``sorted`` sorts the T*k slots by expert once (TopK), gathers the token rows once and
splits them by the per-expert counts (Split with runtime sizes); ``nonzero`` finds each
expert's slots with its own Equal + NonZero. Both return the k results per token through
the inverse permutation of the expert-major order (TopK of the positions), weight them
and sum over k: no Scatter, so fp32 and fp16 run on ONNX Runtime's CPU kernels. They
time the same on CPU (docs/passes.md); ``sorted`` has half the nodes per expert and one
data-dependent shape instead of E NonZeros, which is what GPU execution providers pay for.
``ORT_CPU`` is ``sorted`` with a ScatterND-add combine and com.microsoft.QuickGelu (ONNX
Runtime only; measured faster there) over per-expert gate|up initializers.

Expert weights: the slab index and the gate/up split are constants, so ONNX Runtime
folds Gather/Slice of the stacked initializers into per-expert initializers at session
creation: no weight bytes are copied per run (tests/passes/test_moe_bodies.py checks
the optimized graph; tools/bench_moe.py times the copies it avoids).

``dense`` (target trt-noplugin): every expert on every token as one batched MatMul
[T,H] @ [E,H,2F], combined by a one-hot weight matrix; no NonZero or Scatter, which
the TensorRT ONNX parser rejects. Exact, but E/k times the work of the sparse bodies.
Expert biases and the clamped SwiGLU (plugin_version "3", GPT-OSS): every variant adds expert
e's biases after its projections (constant-index Gather / Slice of the stacked [E, 2F] / [E, H]
biases, folded by ONNX Runtime like the weights) and applies ``Extension.activation``.
Legend: T tokens, H hidden, F intermediate, E experts, k active.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from mixport import ops
from mixport.errors import PassError
from mixport.ops import ONNX_OPSET
from mixport.passes.emit import Emitter, Nodes, last

INPUTS = ["hidden", "weights", "ids", "gate_up", "down"]
ATTRIBUTES = ["num_experts", "k", "activation", "plugin_namespace", "plugin_version"]
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Sparse:
    """The choices of a sparse MoE body; every combination computes the same ``out``.

    grouping: ``sorted`` (TopK of the expert ids, one Gather, Split by per-expert counts) or
              ``nonzero`` (per expert Equal + NonZero + Gather);
    combine:  ``inverse`` (inverse permutation back to slot order, weighted sum over k; no
              Scatter, every float type) or ``scatter_add`` (weight the rows, one ScatterND
              add onto fp32 zeros: ONNX Runtime CPU, whose ScatterND adds fp32 only);
    activation: ``sigmoid`` (x * Sigmoid(x), standard ops) or ``quickgelu``
              (com.microsoft.QuickGelu with alpha 1 = the same silu in one node, ORT only).
    """

    grouping: str = "sorted"
    combine: str = "inverse"
    activation: str = "sigmoid"

    def __post_init__(self) -> None:
        assert self.grouping in ("sorted", "nonzero") and self.combine in ("inverse", "scatter_add") \
            and self.activation in ("sigmoid", "quickgelu"), self


SORTED = Sparse()
NONZERO = Sparse(grouping="nonzero")
# the fast ONNX Runtime CPU graph (runtime/ort_graph.py): scatter-add and QuickGelu measured faster there
ORT_CPU = Sparse(combine="scatter_add", activation="quickgelu")

# expert e -> (gate [H, F] or gate|up [H, 2F], up [H, F] or None, down [F, H]): tensor names
Slabs = Callable[[int], tuple[str, str | None, str]]
# (x, weight name) -> x @ weight: MatMul by default; the fast graph's also emits MatMulNBits
MatMulFn = Callable[[str, str], str]


@dataclass(frozen=True)
class Extension:
    """A version-"3" node's additions (ops.py): expert biases, and its activation."""

    activation: str = "swiglu"  # | "swiglu_clamped"
    alpha: float = ops.SWIGLU_ALPHA
    limit: float = ops.SWIGLU_LIMIT
    biases: Slabs | None = None  # expert e -> (gate [F] or gate|up [2F], up [F] or None, down [H]) bias names


def _scalar(em: Emitter, hint: str, value: float, like: str) -> str:
    """A float constant in ``like``'s type (the bodies run in fp32, fp16 and bf16)."""
    return em.op1("CastLike", [em.const(hint, np.array(value, dtype=np.float32)), like])


def _activation(em: Emitter, g: str, u: str, activation: str, ext: Extension | None) -> str:
    """silu(g) * u, or the clamped SwiGLU (ops.py): (clamp(u, -L, L) + 1) * c * sigmoid(alpha * c), c = min(g, L)."""
    if ext is None or ext.activation == "swiglu":
        if activation == "quickgelu":
            return em.op1("Mul", [em.op1("QuickGelu", [g], domain=MS_DOMAIN, alpha=1.0), u])
        return em.op1("Mul", [em.op1("Mul", [g, em.op1("Sigmoid", [g])]), u])
    limit = _scalar(em, "limit", ext.limit, g)
    c = em.op1("Min", [g, limit])
    if activation == "quickgelu":
        glu = em.op1("QuickGelu", [c], domain=MS_DOMAIN, alpha=float(ext.alpha))
    else:
        glu = em.op1("Mul", [c, em.op1("Sigmoid", [em.op1("Mul", [c, _scalar(em, "alpha", ext.alpha, g)])])])
    clipped = em.op1("Clip", [u, em.op1("Neg", [limit]), limit])
    return em.op1("Mul", [em.op1("Add", [clipped, _scalar(em, "one", 1.0, g)]), glu])


@dataclass(frozen=True)
class _Grouped:
    rows: list[str]  # E names: expert e's token rows [n_e, H]
    slots: str  # [T*k] flat slot (t*k + j) of each row of the concatenated rows
    n_slots: str  # [1] T*k
    tokens: str | None  # [T*k] token of each concatenated row, when already computed


def _ints(em: Emitter, hint: str, values: list[int] | int) -> str:
    return em.const(hint, np.array(values, dtype=np.int64))


def swiglu_ffn(em: Emitter, x: str, gate: str, up: str | None, down: str, activation: str = "sigmoid",
               matmul: MatMulFn | None = None, ext: Extension | None = None,
               biases: tuple[str, str | None, str] | None = None) -> str:
    """(silu(x @ gate) * (x @ up)) @ down; up=None: ``gate`` is gate|up [.., H, 2F], split after.
    ``matmul``: how x @ w is emitted (default one MatMul); ``ext``: the clamped activation,
    ``biases`` (gate or gate|up, up or None, down) added after each projection."""
    mm = matmul or (lambda a, w: em.op1("MatMul", [a, w]))
    bg, bu, bd = biases or (None, None, None)

    def plus(y: str, b: str | None) -> str:
        return y if b is None else em.op1("Add", [y, b])

    if up is None:
        g, u = em.op("Split", [plus(mm(x, gate), bg)], 2, axis=-1, num_outputs=2)
    else:
        g, u = plus(mm(x, gate), bg), plus(mm(x, up), bu)
    return plus(mm(_activation(em, g, u, activation, ext), down), bd)


def stacked_slabs(em: Emitter, gate_up: str, down: str, inter: int) -> Slabs:
    """Expert e's gate [H, F], up [H, F], down [F, H] as constant-index Gather/Slice of the stacked
    weights: ONNX Runtime folds them into per-expert initializers at session creation."""
    zero, f, f2, axis1 = _ints(em, "zero", [0]), _ints(em, "F", [inter]), _ints(em, "F2", [2 * inter]), \
        _ints(em, "axis", [1])

    def slabs(e: int) -> tuple[str, str | None, str]:
        idx = _ints(em, "e", e)
        gu = em.op1("Gather", [gate_up, idx], axis=0)  # [H, 2F]
        return (em.op1("Slice", [gu, zero, f, axis1]), em.op1("Slice", [gu, f, f2, axis1]),
                em.op1("Gather", [down, idx], axis=0))

    return slabs


def stacked_bias_slabs(em: Emitter, gate_up_bias: str, down_bias: str, inter: int) -> Slabs:
    """Expert e's gate [F], up [F], down [H] biases as constant-index Gather / Slice of the stacks."""
    zero, f, f2, axis0 = _ints(em, "zero", [0]), _ints(em, "F", [inter]), _ints(em, "F2", [2 * inter]), \
        _ints(em, "axis", [0])

    def slabs(e: int) -> tuple[str, str | None, str]:
        idx = _ints(em, "e", e)
        gu = em.op1("Gather", [gate_up_bias, idx], axis=0)  # [2F]
        return (em.op1("Slice", [gu, zero, f, axis0]), em.op1("Slice", [gu, f, f2, axis0]),
                em.op1("Gather", [down_bias, idx], axis=0))

    return slabs


def _group_sorted(em: Emitter, hidden: str, ids: str, k: int, num_experts: int) -> _Grouped:
    """Slots sorted by expert once (TopK), token rows gathered once, split by per-expert counts
    (Split with runtime sizes, zero allowed)."""
    flat = em.op1("Reshape", [ids, _ints(em, "flat", [-1])])  # [T*k] expert of each slot
    n_slots = em.op1("Shape", [flat])
    _, order = em.op("TopK", [flat, n_slots], 2, largest=0, sorted=1)  # slots by expert
    tokens = em.op1("Div", [order, _ints(em, "k", k)])  # int64: slot // k = token
    rows = em.op1("Gather", [hidden, tokens], axis=0)  # [T*k, H]
    hit = em.op1("Equal", [em.op1("Unsqueeze", [flat, _ints(em, "axis", [1])]),
                           _ints(em, "experts", list(range(num_experts)))])  # [T*k, E]
    counts = em.op1("ReduceSum", [em.op1("Cast", [hit], to=TensorProto.INT64), _ints(em, "axis", [0])],
                    keepdims=0)  # [E]
    return _Grouped(em.op("Split", [rows, counts], num_experts, axis=0), order, n_slots, tokens)


def _group_nonzero(em: Emitter, hidden: str, ids: str, k: int, num_experts: int) -> _Grouped:
    """Each expert finds its slots with its own Equal + NonZero."""
    flat = em.op1("Reshape", [ids, _ints(em, "flat", [-1])])  # [T*k]
    kk, minus1 = _ints(em, "k", k), _ints(em, "flat", [-1])
    rows, positions = [], []
    for e in range(num_experts):
        nz = em.op1("NonZero", [em.op1("Equal", [flat, _ints(em, "e", e)])])  # [1, n]
        positions.append(em.op1("Reshape", [nz, minus1]))  # [n] flat slots
        rows.append(em.op1("Gather", [hidden, em.op1("Div", [positions[-1], kk])], axis=0))  # [n, H]
    slots = em.op1("Concat", positions, axis=0)  # [T*k]
    return _Grouped(rows, slots, em.op1("Shape", [slots]), None)


def _combine_inverse(em: Emitter, ys: str, grouped: _Grouped, weights: str, ids: str, out: str | None) -> str:
    """Rows back to slot order (TopK of the slot positions = the inverse permutation), then
    sum_j weights[t, j] * y[t, j]."""
    _, inverse = em.op("TopK", [grouped.slots, grouped.n_slots], 2, largest=0, sorted=1)
    in_slot_order = em.op1("Gather", [ys, inverse], axis=0)  # [T*k, H], t*k + j
    shape3 = em.op1("Concat", [em.op1("Shape", [ids]), _ints(em, "minus1", [-1])], axis=0)
    y3 = em.op1("Reshape", [in_slot_order, shape3])  # [T, k, H]
    w3 = em.op1("Unsqueeze", [weights, _ints(em, "axis", [2])])  # [T, k, 1]
    return last(em, "ReduceSum", [em.op1("Mul", [y3, w3]), _ints(em, "axis", [1])], out, keepdims=0)


def _combine_scatter(em: Emitter, ys: str, grouped: _Grouped, weights: str, hidden: str, k: int,
                     elem_type: int, out: str | None) -> str:
    """Weight each row, then one ScatterND add of the rows onto their tokens, in fp32."""
    w = em.op1("Gather", [em.op1("Reshape", [weights, _ints(em, "col", [-1, 1])]), grouped.slots],
               axis=0)  # [T*k, 1] in row order
    yw = em.op1("Mul", [ys, w])
    tokens = grouped.tokens or em.op1("Div", [grouped.slots, _ints(em, "k", k)])
    index = em.op1("Unsqueeze", [tokens, _ints(em, "axis", [1])])  # [T*k, 1]
    zeros = em.op1("ConstantOfShape", [em.op1("Shape", [hidden])])  # fp32 [T, H]
    if elem_type == TensorProto.FLOAT:
        return last(em, "ScatterND", [zeros, index, yw], out, reduction="add")
    summed = em.op1("ScatterND", [zeros, index, em.op1("Cast", [yw], to=TensorProto.FLOAT)], reduction="add")
    return last(em, "Cast", [summed], out, to=elem_type)


def sparse_moe(em: Emitter, hidden: str, weights: str, ids: str, k: int, num_experts: int, slabs: Slabs,
               variant: Sparse = SORTED, elem_type: int = TensorProto.FLOAT, out: str | None = None,
               matmul: MatMulFn | None = None, ext: Extension | None = None) -> str:
    """Sparse MoE: each expert runs its FFN on its own token rows only (an expert with no tokens
    does 0-row MatMuls), the k results per token are weighted and summed -> out [T, H].
    ``elem_type``: the float type of hidden/weights (``scatter_add`` casts to fp32 and back);
    ``matmul``: how each x @ slab is emitted (``swiglu_ffn``)."""
    group = _group_nonzero if variant.grouping == "nonzero" else _group_sorted
    grouped = group(em, hidden, ids, k, num_experts)
    biases = (lambda e: None) if ext is None or ext.biases is None else ext.biases
    ys = em.op1("Concat", [swiglu_ffn(em, x, *slabs(e), variant.activation, matmul, ext, biases(e))
                           for e, x in enumerate(grouped.rows)], axis=0)  # [T*k, H] in row order
    if variant.combine == "scatter_add":
        return _combine_scatter(em, ys, grouped, weights, hidden, k, elem_type, out)
    return _combine_inverse(em, ys, grouped, weights, ids, out)


def dense_moe(em: Emitter, hidden: str, weights: str, ids: str, gate_up: str, down: str, num_experts: int,
              out: str | None = None, ext: Extension | None = None,
              bias_stacks: tuple[str, str] | None = None) -> str:
    """All experts on all tokens; dense [T, E] routing weights from a one-hot of the ids."""
    onehot = em.op1("Equal", [em.op1("Unsqueeze", [ids, _ints(em, "axis", [2])]),
                              _ints(em, "experts", list(range(num_experts)))])  # [T, k, E]
    spread = em.op1("Mul", [em.op1("CastLike", [onehot, weights]),
                            em.op1("Unsqueeze", [weights, _ints(em, "axis", [2])])])
    dense_w = em.op1("ReduceSum", [spread, _ints(em, "axis", [1])], keepdims=0)  # [T, E]
    scale = em.op1("Unsqueeze", [em.op1("Transpose", [dense_w], perm=[1, 0]), _ints(em, "axis", [2])])  # [E, T, 1]
    biases = None if bias_stacks is None else tuple(  # [E, 1, 2F], None, [E, 1, H]: broadcast over T
        em.op1("Unsqueeze", [b, _ints(em, "axis", [1])]) for b in bias_stacks)
    y = swiglu_ffn(em, hidden, gate_up, None, down, ext=ext,  # [E, T, H]: [T, H] @ [E, H, 2F] broadcast
                   biases=None if biases is None else (biases[0], None, biases[1]))
    return last(em, "ReduceSum", [em.op1("Mul", [y, scale]), _ints(em, "axis", [0])], out, keepdims=0)


Body = Callable[..., None]  # (em, E, k, F, gate_up, down, ext=None): nodes -> "out"


def _extension(em: Emitter, ext: Extension | None, inter: int) -> Extension | None:
    """``ext`` with its biases read from the body's bias inputs (ops.BIAS_INPUTS)."""
    if ext is None:
        return None
    from dataclasses import replace

    return replace(ext, biases=stacked_bias_slabs(em, *ops.BIAS_INPUTS, inter))


def _sparse_body(variant: Sparse) -> Body:
    def nodes(em: Emitter, num_experts: int, k: int, inter: int, gate_up: str, down: str,
              ext: Extension | None = None) -> None:
        sparse_moe(em, "hidden", "weights", "ids", k, num_experts, stacked_slabs(em, gate_up, down, inter),
                   variant, out="out", ext=_extension(em, ext, inter))

    return nodes


def dense_nodes(em: Emitter, num_experts: int, k: int, inter: int, gate_up: str, down: str,
                ext: Extension | None = None) -> None:
    """The dense body's nodes (k and F come from the inputs' shapes; BODIES share one signature)."""
    dense_moe(em, "hidden", "weights", "ids", gate_up, down, num_experts, out="out", ext=ext,
              bias_stacks=None if ext is None else ops.BIAS_INPUTS)


sorted_nodes = _sparse_body(SORTED)
nonzero_nodes = _sparse_body(NONZERO)
BODIES: dict[str, Body] = {"sorted": sorted_nodes, "nonzero": nonzero_nodes, "dense": dense_nodes}


@dataclass(frozen=True)
class Quant:
    """A quantized MoE node's weights (ops.py): bits, block size, zero points or not."""

    bits: int
    block_size: int
    zero_points: bool

    @property
    def inputs(self) -> list[str]:
        return [*ops.MOE_INPUTS, *ops.QUANT_INPUTS, *(ops.ZERO_INPUTS if self.zero_points else ())]


def dequantized_stacks(em: Emitter, q: Quant) -> tuple[str, str]:
    """The float [E, H, 2F] and [E, F, H] stacks of a quantized node's inputs: blocked
    DequantizeLinear along the input axis (ONNX Gather does not take int4, so the whole stack
    is dequantized and the body slices the float result)."""
    zeros = ops.ZERO_INPUTS if q.zero_points else (None, None)
    return tuple(em.op1("DequantizeLinear", [w, s] + ([z] if z else []), axis=1, block_size=q.block_size)
                 for w, s, z in zip(("gate_up", "down"), ops.QUANT_INPUTS, zeros, strict=True))  # type: ignore


def moe_function(body: str, num_experts: int, k: int, inter: int, quant: Quant | None = None,
                 ext: Extension | None = None) -> onnx.FunctionProto:
    """The FunctionProto for mixport::MoE: ``body`` (one of BODIES) for E experts, top-k, F
    (with ``quant``: for quantized expert weights, dequantized first; with ``ext``: a version-"3"
    node's biases and activation)."""
    em = Nodes()
    gate_up, down = ("gate_up", "down") if quant is None else dequantized_stacks(em, quant)
    BODIES[body](em, num_experts, k, inter, gate_up, down, ext=ext)
    inputs = list(INPUTS) if quant is None else quant.inputs
    attributes = ATTRIBUTES if quant is None else [*ATTRIBUTES, "bits", "block_size"]
    if ext is not None:
        inputs, attributes = [*inputs, *ops.BIAS_INPUTS], [*attributes, "alpha", "limit"]
    opset = ONNX_OPSET if quant is None else ops.QUANT_OPSET
    return helper.make_function(ops.DOMAIN, ops.MOE, inputs, ["out"], em.nodes,
                                [helper.make_opsetid("", opset)], attributes=attributes)


def quantized(model: onnx.ModelProto) -> bool:
    """Does ``model`` hold quantized weights (a quantized MoE node or a blocked DequantizeLinear)?"""
    return any((n.domain == ops.DOMAIN and n.op_type == ops.MOE and _attr(n, "bits") is not None)
               or (n.op_type == "DequantizeLinear" and _attr(n, "block_size")) for n in model.graph.node)


def _quant_of(node: onnx.NodeProto) -> Quant | None:
    bits = _attr(node, "bits")
    if bits is None:
        return None
    extra = len(ops.BIAS_INPUTS) if extension_of(node) is not None else 0
    return Quant(bits, _attr(node, "block_size") or 0,
                 len(node.input) - extra > len(ops.MOE_INPUTS) + len(ops.QUANT_INPUTS))


def extension_of(node: onnx.NodeProto) -> Extension | None:
    """A version-"3" MoE node's activation (its biases are its last two inputs), else None."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("plugin_version", b"").decode() != ops.BIAS_PLUGIN_VERSION:
        return None
    activation = attrs.get("activation", b"swiglu").decode()
    if activation not in ops.ACTIVATIONS:
        raise PassError(f"MoE node '{node.name}' has an unknown activation", given=activation,
                        expected=" | ".join(ops.ACTIVATIONS))
    return Extension(activation, float(attrs.get("alpha", ops.SWIGLU_ALPHA)),
                     float(attrs.get("limit", ops.SWIGLU_LIMIT)))


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
    kinds = {(_attr(n, "num_experts"), _attr(n, "k"), down_dims.get(n.input[4]), _quant_of(n), extension_of(n))
             for n in moes}
    if len(kinds) != 1 or None in next(iter(kinds))[:3]:
        raise PassError("cannot attach one MoE function body: the MoE nodes disagree or lack constant weights",
                        given=f"(num_experts, k, intermediate, quantization, extension) = {sorted(map(str, kinds))}",
                        expected="one E, k, F and quantization for every MoE node, weights as initializers")
    model.functions.append(moe_function(body, *kinds.pop()))
    if not any(o.domain == ops.DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION))
    return 1
