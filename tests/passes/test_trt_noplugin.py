"""The trt-noplugin MoE body parses in TensorRT-RTX's ONNX parser and builds an engine (CPU-only AOT)."""

from __future__ import annotations

import numpy as np
import pytest

from mixport import ops
from mixport.engine.symlink import ensure_parser_symlink
from mixport.passes import run_pipeline
from mixport.tools.moe_layer import LayerSpec, dense_layer
from tests.helpers import require_module


def _tensorrt_rtx():  # -> module
    trt = require_module("tensorrt_rtx_bindings", "tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")
    ensure_parser_symlink()  # the parser dlopens the unversioned name; raises with the command if it cannot
    return trt


def _parse(trt, model_bytes: bytes):  # -> (builder, network, parser, errors)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(model_bytes)
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    return builder, network, parser, (None if ok else errors)


@pytest.mark.slow
def test_trt_noplugin_body_parses_and_builds() -> None:
    trt = _tensorrt_rtx()
    fused, counts = run_pipeline(dense_layer(LayerSpec(hidden=32, inter=48, experts=4, k=2)),
                                 target="trt-noplugin")
    assert counts["fuse_moe_experts"] == 1
    assert not {"NonZero", "ScatterND", "ScatterElements"} & {n.op_type for f in fused.functions for n in f.node}
    builder, network, _parser, errors = _parse(trt, fused.SerializeToString())
    assert errors is None, errors
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("hidden", (1, 32), (16, 32), (256, 32))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    assert engine is not None and engine.nbytes > 0


@pytest.mark.slow
def test_whole_tiny_export_parses_with_trt_noplugin(tiny_unfused) -> None:
    trt = _tensorrt_rtx()
    fused, counts = run_pipeline(tiny_unfused, target="trt-noplugin")
    assert counts["fuse_moe_experts"] == 2
    _builder, _network, _parser, errors = _parse(trt, fused.SerializeToString())
    assert errors is None, errors


V3_ROUTINGS = {  # TopKRouting version 3 bodies: the same builder serves trt-noplugin
    "sigmoid-bias-top2sum-groups": (ops.RoutingSpec(4, "renormalize", scoring="sigmoid", bias=True, n_group=4,
                                                    topk_group=2, group_score="top2_sum", scaling=2.5), 8),
    "softmax-max-groups": (ops.RoutingSpec(2, "none", n_group=4, topk_group=2, scaling=16.0), 8),
    "sparsemixer": (ops.RoutingSpec(2, "none", scoring="sparsemixer", eps=0.01), 6),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", V3_ROUTINGS)
def test_trt_noplugin_v3_routing_parses_and_builds(case: str) -> None:
    """Grouped / biased / sigmoid / sparsemixer routing bodies (TopK, ArgMax, GatherElements, Equal/Where
    masks; no scatter) parse in TensorRT-RTX's parser and build an engine."""
    trt = _tensorrt_rtx()
    routing, experts = V3_ROUTINGS[case]
    bias = tuple(float(b) for b in np.linspace(-0.2, 0.2, experts)) if routing.bias else ()
    fused, counts = run_pipeline(dense_layer(LayerSpec(hidden=32, inter=48, experts=experts, k=routing.k,
                                                       routing=routing, selection_bias=bias)),
                                 target="trt-noplugin")
    assert counts["fuse_moe_experts"] == 1
    assert not {"NonZero", "ScatterND", "ScatterElements"} & {n.op_type for f in fused.functions for n in f.node}
    builder, network, _parser, errors = _parse(trt, fused.SerializeToString())
    assert errors is None, errors
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("hidden", (1, 32), (16, 32), (256, 32))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    assert engine is not None and engine.nbytes > 0
