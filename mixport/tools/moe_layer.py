"""One Mixtral MoE layer as an ONNX graph, built with onnx.helper the way the exporter emits it.

Router Gemm -> mixport::TopKRouting -> per expert (Equal/Cast/Mul/ReduceSum weight,
w1/w3/w2 Gemm with transB, Sigmoid*x silu) -> Add chain from zeros. Used by the
benchmark and by the pass tests as a graph that did not come from torch.
Legend: T tokens, H hidden, F intermediate, E experts, k active.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mixport import ops
from mixport.exporter import routing_onnx


@dataclass(frozen=True)
class LayerSpec:
    hidden: int = 512
    inter: int = 1792
    experts: int = 8
    k: int = 2
    seed: int = 0
    router_bias: tuple[float, ...] = ()  # added to the router logits per expert (skews routing)
    normalization: str = "renormalize"
    order: str = ops.ORDERS[0]  # TopKRouting's order (ops.ORDERS)
    routing: ops.RoutingSpec | None = None  # TopKRouting version 3 (overrides k, normalization, order)
    selection_bias: tuple[float, ...] = ()  # its bias input, when routing.bias


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(arr.astype(np.float32)), name)


def _expert_nodes(e: int) -> list[onnx.NodeProto]:
    p, s = f"experts.{e}", f"_{e}"
    return [
        helper.make_node("Constant", [], [f"idx{s}"], value=helper.make_tensor("v", TensorProto.INT64, [], [e])),
        helper.make_node("Equal", ["ids", f"idx{s}"], [f"eq{s}"]),
        helper.make_node("Cast", [f"eq{s}"], [f"eqf{s}"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["weights", f"eqf{s}"], [f"mw{s}"]),
        helper.make_node("ReduceSum", [f"mw{s}", "last"], [f"w{s}"], keepdims=1),
        helper.make_node("Gemm", ["hidden", f"{p}.w1.weight"], [f"g{s}"], transB=1),
        helper.make_node("Sigmoid", [f"g{s}"], [f"sg{s}"]),
        helper.make_node("Mul", [f"g{s}", f"sg{s}"], [f"silu{s}"]),
        helper.make_node("Gemm", ["hidden", f"{p}.w3.weight"], [f"u{s}"], transB=1),
        helper.make_node("Mul", [f"silu{s}", f"u{s}"], [f"a{s}"]),
        helper.make_node("Gemm", [f"a{s}", f"{p}.w2.weight"], [f"y{s}"], transB=1),
        helper.make_node("Mul", [f"y{s}", f"w{s}"], [f"yw{s}"]),
        helper.make_node("Add", [f"acc{e}", f"yw{s}"], [f"acc{e + 1}"]),
    ]


def dense_layer(spec: LayerSpec) -> onnx.ModelProto:
    """The unfused layer: input ``hidden`` [T, H] -> output ``out`` [T, H] (fp32)."""
    rng = np.random.default_rng(spec.seed)
    h, f, n = spec.hidden, spec.inter, spec.experts
    inits = [_init("gate.weight", rng.standard_normal((n, h)) * h**-0.5),
             numpy_helper.from_array(np.array([-1], np.int64), "last")]
    if spec.router_bias:
        inits.append(_init("gate.bias", np.array(spec.router_bias)))
    routing = spec.routing or ops.RoutingSpec(spec.k, spec.normalization, spec.order)
    if routing.bias:
        inits.append(_init("gate.selection_bias", np.array(spec.selection_bias)))
    nodes = [helper.make_node("Gemm", ["hidden", "gate.weight", *(["gate.bias"] if spec.router_bias else [])],
                              ["logits"], transB=1),
             helper.make_node(ops.TOPK_ROUTING, ["logits", *(["gate.selection_bias"] if routing.bias else [])],
                              ["weights", "ids"], domain=ops.DOMAIN,
                              **routing_onnx.routing_attributes(routing.k, n, routing.normalization, spec=routing)),
             helper.make_node("Shape", ["hidden"], ["shape"]),
             helper.make_node("ConstantOfShape", ["shape"], ["acc0"])]
    for e in range(n):
        for w, shape in (("w1", (f, h)), ("w3", (f, h)), ("w2", (h, f))):
            inits.append(_init(f"experts.{e}.{w}.weight", rng.standard_normal(shape) * shape[1] ** -0.5))
        nodes += _expert_nodes(e)
    nodes[-1].output[0] = "out"
    graph = helper.make_graph(nodes, "moe_layer",
                              [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["T", h])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["T", h])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", routing_onnx.ONNX_OPSET),
                                                    helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION)])
    model.functions.append(routing_onnx.routing_function(routing.k, routing.normalization, TensorProto.FLOAT,
                                                         spec=routing, num_experts=n))
    return model


def swiglu_mlp(hidden: int = 16, inter: int = 24, seed: int = 0) -> onnx.ModelProto:
    """A plain (non-MoE) SwiGLU MLP with the same per-expert shape: nothing to fuse here."""
    rng = np.random.default_rng(seed)
    inits = [_init("w1", rng.standard_normal((inter, hidden))), _init("w3", rng.standard_normal((inter, hidden))),
             _init("w2", rng.standard_normal((hidden, inter)))]
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["g"], transB=1), helper.make_node("Sigmoid", ["g"], ["s"]),
             helper.make_node("Mul", ["g", "s"], ["silu"]), helper.make_node("Gemm", ["x", "w3"], ["u"], transB=1),
             helper.make_node("Mul", ["silu", "u"], ["a"]), helper.make_node("Gemm", ["a", "w2"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "swiglu_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", routing_onnx.ONNX_OPSET)])
