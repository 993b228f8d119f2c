"""A tiny seeded ONNX graph that exercises both mixport nodes (tests and self-checks).

    hidden [T, H] -> MatMul router -> mixport::TopKRouting -> mixport::MoE -> out [T, H]

Both nodes carry ``plugin_namespace``/``plugin_version`` and the shipped model-local
function bodies: ``exporter.routing_onnx.routing_function`` (softmax/top-k/renormalize by
default; ``order``/``normalization`` pick another mode, ``order=None`` writes a version-1
TopKRouting node: no ``order`` attribute, plugin_version "1") and ``passes.moe_bodies``'
dense body (one-hot combine weights, batched MatMul over all experts; what the
trt-noplugin target attaches), so the file runs with or without plugins.
T tokens (dynamic), H hidden, F expert FFN width, E experts, k active.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mixport.ops import (
    DOMAIN,
    MOE,
    ONNX_OPSET,
    OPSET_VERSION,
    ORDERS,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    TOPK_ROUTING,
)

NORMALIZATION = "renormalize"
MOE_BODY = "dense"  # the body the TensorRT parser takes when no plugin is registered (trt-noplugin)


def _float_io(name: str, dim: int) -> Any:
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["T", dim])


def tiny_moe_model(hidden: int = 32, ffn: int = 48, experts: int = 4, k: int = 2,
                   seed: int = 0, plugin_attrs: bool = True, normalization: str = NORMALIZATION,
                   order: str | None = ORDERS[0]) -> Any:
    """The tiny router + TopKRouting + MoE model (fp32, dynamic T) as a ModelProto
    (``order=None``: a version-1 TopKRouting node, as files written before ``order`` existed)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from mixport.exporter.routing_onnx import routing_function
    from mixport.passes.moe_bodies import moe_function

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)
             for name, shape in (("router", (hidden, experts)),
                                 ("gate_up", (experts, hidden, 2 * ffn)),
                                 ("down", (experts, ffn, hidden)))]
    def extra(version: str) -> dict[str, str]:
        return {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": version} if plugin_attrs else {}

    mode = {"normalization": normalization} if order is None else {"normalization": normalization, "order": order}
    nodes = [
        helper.make_node("MatMul", ["hidden", "router"], ["logits"], name="router"),
        helper.make_node(TOPK_ROUTING, ["logits"], ["weights", "ids"], name="routing",
                         domain=DOMAIN, k=k, num_experts=experts, scoring_func="softmax",
                         **mode, **extra("1" if order is None else "2")),  # version-1 / version-2 files
        helper.make_node(MOE, ["hidden", "weights", "ids", "gate_up", "down"], ["out"],
                         name="moe", domain=DOMAIN, num_experts=experts, k=k,
                         activation="swiglu", **extra(PLUGIN_VERSION)),
    ]
    graph = helper.make_graph(
        nodes, "tiny_moe", [_float_io("hidden", hidden)],
        [_float_io("out", hidden), _float_io("weights", k),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["T", k])], inits)
    model = helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(DOMAIN, OPSET_VERSION)],
        functions=[routing_function(k, normalization, TensorProto.FLOAT, order or ORDERS[0]),
                   moe_function(MOE_BODY, experts, k, ffn)])
    model.ir_version = 10
    return model


def write_tiny_moe_model(path: str | Path, **kwargs: Any) -> Path:
    """Save ``tiny_moe_model(**kwargs)`` to ``path`` and return it."""
    import onnx

    onnx.save(tiny_moe_model(**kwargs), str(path))
    return Path(path)
