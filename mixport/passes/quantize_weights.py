"""quantize_weights: weight-only block quantization of a fused graph (``mixport export --quantize``).

Rewrites, by structure (never by tensor name):

* every ``mixport::MoE`` node with float stacked experts: gate_up [E, H, 2F] and down [E, F, H]
  become int8 / int4 / uint4 tensors plus per-expert, per-block scales (and zero points), the
  node gains ``bits`` / ``block_size`` and ``plugin_version`` "2" (the contract in ``ops.py``);
* every MatMul (or Gemm) of an activation with a constant 2-D weight -- attention q/k/v/o,
  shared experts, dense MLPs -- becomes ``DequantizeLinear(q, scale[, zero], axis=0,
  block_size=B) -> MatMul`` (a Gemm's bias is added after);

and leaves alone what must stay exact: the routers (a weight whose product reaches a
``TopKRouting`` node), gates of one output column (Qwen2-MoE's shared_expert_gate), norms,
the embedding lookup, and the lm_head (the product that becomes the ``logits`` output) unless
``lm_head`` is asked for. The original constants are never edited: new ones are made and the
old ones go at cleanup (a weight shared with the embedding lookup stays for it).
Numbers: ``mixport/quant.py``. Quantized tensors are named after their source weight with the
suffixes ``_quantized``, ``_scale``, ``_zero_point`` (ONNX Runtime's quantization tools' names).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from mixport import ops, quant
from mixport.errors import NoMatch
from mixport.onnx_io import WeightFiles
from mixport.passes import graph_utils as gu
from mixport.quant import QuantOptions

NAME = "quantize_weights"
LOGITS = "logits"  # the exporter's output name: its producing MatMul is the lm_head
_PASS_THROUGH = ("Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Div", "Mul", "Add")


def apply(graph: gs.Graph, reasons: list[str], files: WeightFiles | None, options: QuantOptions) -> int:
    """Quantize the graph's expert and dense weights; return how many nodes were rewritten."""
    made: dict[tuple[str, bool], list[gs.Constant]] = {}
    count = 0
    for node in list(graph.nodes):
        try:
            if node.domain == ops.DOMAIN and node.op == ops.MOE:
                count += _moe(graph, node, files, options.scheme)
            elif node.op in ("MatMul", "Gemm") and (node.domain or "") in ("", "ai.onnx"):
                count += _dense(graph, node, files, options, made)
        except NoMatch as why:
            reasons.append(f"{NAME}: node '{node.name}': {why}")
    if count:
        graph.cleanup().toposort()
    return count


def _constants(graph: gs.Graph, base: str, w: np.ndarray, slabs: Iterable[np.ndarray], scheme: quant.Scheme,
               files: WeightFiles | None) -> list[gs.Constant]:
    """q, scale (and zero) of W ([in, out], or stacked experts [E, in, out]; only its shape and dtype
    are used here) as constants named after ``base``: ``slabs`` gives W's [in, out] slabs in order,
    each quantized a few rows at a time and every part written to the work file as it comes
    (``quant.quantize_rows``), never all of W in memory."""
    *lead, n_in, n_out = w.shape
    nb = quant.blocks(n_in, scheme.block_size)
    specs = [("_quantized", scheme.qdtype, (*lead, n_in, n_out)), ("_scale", w.dtype, (*lead, nb, n_out))]
    if not scheme.symmetric:
        specs.append(("_zero_point", quant.UINT4, (*lead, nb, n_out)))
    writers = [gu.ConstantWriter(gu.unique_name(graph, f"{base}{suffix}"), dtype, tuple(shape), files)
               for suffix, dtype, shape in specs]
    for slab in slabs:
        for part in quant.quantize_rows(slab, scheme):
            for writer, values in zip(writers, (part.q, part.scale, part.zero), strict=False):
                writer.write(values)
        del slab  # unmapped before the next one is read
    return [writer.close() for writer in writers]


def _moe(graph: gs.Graph, node: gs.Node, files: WeightFiles | None, scheme: quant.Scheme) -> int:
    extended = node.attrs.get("plugin_version") == ops.BIAS_PLUGIN_VERSION  # biases last, kept float
    if "bits" in node.attrs or len(node.inputs) != len(ops.MOE_INPUTS) + (len(ops.BIAS_INPUTS) if extended else 0):
        raise NoMatch("its experts are already quantized")
    stacks = [gu.const_array(t) for t in node.inputs[3:5]]
    if any(a is None or a.ndim != 3 for a in stacks):
        raise NoMatch("its gate_up / down inputs are not constant [E, in, out] weights")
    parts = [_constants(graph, t.name, a, gu.slabs(t), scheme, files)  # one expert's slab at a time
             for t, a in zip(node.inputs[3:5], stacks, strict=True)]
    (gq, gs_, *gz), (dq, ds, *dz) = parts
    node.inputs[3] = gq
    node.inputs[4] = dq
    biases = [node.inputs.pop() for _ in range(len(node.inputs) - len(ops.MOE_INPUTS))][::-1]  # version "3"'s:
    #                                                                   they go after the scales and zero points
    node.inputs.extend([gs_, ds, *gz, *dz, *biases])
    node.attrs.update(bits=scheme.bits, block_size=scheme.block_size,
                      plugin_version=ops.BIAS_PLUGIN_VERSION if extended else ops.QUANT_PLUGIN_VERSION)
    return 1


def _weight(node: gs.Node) -> tuple[gs.Tensor, bool, np.ndarray, gs.Tensor | None] | None:
    """(the constant, is it transposed, W as [in, out], a Gemm's bias) when ``node`` = activation @
    constant 2-D W."""
    if len(node.inputs) < 2:
        return None
    w, bias = node.inputs[1], None
    transposed = False
    if node.op == "Gemm":
        if node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0:
            return None
        transposed = bool(node.attrs.get("transB", 0))
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    else:
        tr = gu.producer_op(w, "Transpose")
        if tr is not None and list(tr.attrs.get("perm", [1, 0])) == [1, 0]:
            w, transposed = tr.inputs[0], True
    if gu.const_array(node.inputs[0]) is not None:
        return None  # a product of two constants: folding's business
    arr = gu.const_array(w)
    if arr is None or arr.ndim != 2 or arr.dtype.kind not in "fV":  # V: bf16 (ml_dtypes)
        return None
    return w, transposed, (arr.T if transposed else arr), bias


def _reaches(tensor: gs.Tensor, want: str, depth: int = 4) -> bool:
    """Does ``tensor`` flow into a node ``want`` (or a graph output named ``want``) through at most
    ``depth`` reshaping / scaling ops?"""
    if tensor.name == want:
        return True
    for user in tensor.outputs:
        if user.op == want:
            return True
        if depth and user.op in _PASS_THROUGH and any(_reaches(o, want, depth - 1) for o in user.outputs):
            return True
    return False


def _dense(graph: gs.Graph, node: gs.Node, files: WeightFiles | None, options: QuantOptions,
           made: dict[tuple[str, bool], list[gs.Constant]]) -> int:
    found = _weight(node)
    if found is None:
        return 0
    w, transposed, arr, bias = found
    out = node.outputs[0]
    if _reaches(out, ops.TOPK_ROUTING) or arr.shape[1] < 2:
        return 0  # a router or a one-column gate: never quantized
    if _reaches(out, LOGITS) and not options.lm_head:
        return 0
    key = (w.name, transposed)
    if key not in made:
        made[key] = _constants(graph, w.name, arr, [arr], options.scheme, files)
    dq_out = gs.Variable(gu.unique_name(graph, f"{w.name}_dequantized"),
                         dtype=helper.np_dtype_to_tensor_dtype(arr.dtype), shape=list(arr.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", gu.unique_name(graph, f"{node.name}/DequantizeLinear"),
                               dict(axis=0, block_size=options.scheme.block_size), list(made[key]), [dq_out]))
    x = node.inputs[0]
    node.outputs.clear()
    if bias is None:
        graph.nodes.append(gs.Node("MatMul", node.name, inputs=[x, dq_out], outputs=[out]))
        return 1
    mm = gs.Variable(gu.unique_name(graph, f"{node.name}_matmul"))
    graph.nodes.append(gs.Node("MatMul", node.name, inputs=[x, dq_out], outputs=[mm]))
    graph.nodes.append(gs.Node("Add", f"{node.name}/bias", inputs=[mm, bias], outputs=[out]))
    return 1
