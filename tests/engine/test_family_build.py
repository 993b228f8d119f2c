"""`mixport build` with plugin layers on tiny exports of the Mixtral family (CPU-only, TensorRT-RTX).

One export + build per family (module-scoped): Qwen3-MoE (softmax -> top-k -> renormalize, q/k
norms, head_dim != hidden/heads) and Granite-MoE (top-k -> softmax over the k: TopKRouting
version 2 with ``order="topk_softmax"``, muP scalars). Every TopKRouting and MoE node must become
a plugin layer of its version, the node's routing mode reaching the plugin.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import onnx
import pytest

from mixport import ops
from mixport.artifact import Manifest
from mixport.exporter.tiny import TINY, write_tiny
from tests.helpers import invoke

pytestmark = pytest.mark.slow  # five torch exports (~10-45 s each on 2 shared cores)

FAMILIES = {  # model_type -> (config changes, the routing mode its TopKRouting nodes carry)
    "qwen3_moe": (dict(num_experts_per_tok=4, head_dim=24, normalization="renormalize", qk_norm="head"),
                  ("softmax_topk", "renormalize")),
    "granitemoe": (dict(normalization="none", routing_order="topk_softmax"), ("topk_softmax", "none")),
    "qwen2_moe": (dict(shared_expert_intermediate_size=48, shared_expert_gate=True, qkv_bias=True, dense_layers=(1,),
                       dense_intermediate_size=56, normalization="none", bos_token_id=None, eos_token_id=None),
                  ("softmax_topk", "none")),  # the gated shared expert and the dense layer build as plain layers
    "olmoe": (dict(qk_norm="projection", clip_qkv=2.0, num_experts_per_tok=3, normalization="none",
                   bos_token_id=None, eos_token_id=None), ("softmax_topk", "none")),
    "granitemoeshared": (dict(normalization="none", routing_order="topk_softmax", shared_expert_intermediate_size=32),
                         ("topk_softmax", "none")),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_engine(request: pytest.FixtureRequest, trt_module: ModuleType,
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(model_type, an export folder of that family built by `mixport build`)."""
    from mixport.exporter.export import export

    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    src = write_tiny(root / "src", replace(TINY, model_type=model_type, **FAMILIES[model_type][0]), seed=0)
    out = export(src, root / "out").out_dir
    result = invoke("build", out)
    assert result.exit_code == 0, result.output
    return model_type, out


def _moe_layers(model_type: str) -> int:
    """The decoder layers with a router in the family's tiny config (a dense layer has none)."""
    cfg = replace(TINY, **FAMILIES[model_type][0])
    return cfg.num_hidden_layers - len(cfg.dense_layers)


def _nodes(folder: Path) -> list[onnx.NodeProto]:
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return [n for n in model.graph.node if n.domain == ops.DOMAIN]


def test_family_builds_with_a_plugin_layer_per_mixport_node(family_engine: tuple[str, Path]) -> None:
    model_type, folder = family_engine
    nodes = _nodes(folder)
    counts = Counter(n.op_type for n in nodes)
    manifest = Manifest.read(folder)
    layers = Counter(layer["plugin"] for layer in manifest.engine.plugin_layers)
    assert counts == {ops.TOPK_ROUTING: _moe_layers(model_type), ops.MOE: _moe_layers(model_type)}
    assert layers == Counter({f"mixport::{op}": n for op, n in counts.items()})
    assert manifest.engine.use_plugins and (folder / "model.engine").stat().st_size > 0
    order, normalization = FAMILIES[model_type][1]
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        version = ops.ROUTING_PLUGIN_VERSION if node.op_type == ops.TOPK_ROUTING else ops.PLUGIN_VERSION
        assert attrs["plugin_version"] == version.encode()
        if node.op_type == ops.TOPK_ROUTING:
            assert (attrs["order"], attrs["normalization"]) == (order.encode(), normalization.encode())


def test_family_routing_mode_reaches_the_plugins(family_engine: tuple[str, Path], trt_module: ModuleType) -> None:
    """The network `mixport build` parses: each TopKRouting plugin (version 2) computes the node's order."""
    from mixport.engine.network import parse_onnx
    from mixport.engine.prepare import prepare_for_parser
    from mixport.engine.trt_logger import make_logger

    model_type, folder = family_engine
    trt = trt_module
    logger = make_logger(trt)
    with tempfile.TemporaryDirectory() as tmp:
        source, _ = prepare_for_parser(folder / "model.onnx", Path(tmp))
        network = parse_onnx(trt, trt.Builder(logger), logger, source, use_plugins=True).network
        plugins = []
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.PLUGIN_V3:
                layer.__class__ = trt.IPluginV3Layer
                plugins.append(layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE))
    routing = [p for p in plugins if p.plugin_name == ops.TOPK_ROUTING]
    assert len(routing) == _moe_layers(model_type) and len(plugins) == 2 * _moe_layers(model_type)
    order, normalization = FAMILIES[model_type][1]
    for plugin in routing:
        assert plugin.plugin_version == ops.ROUTING_PLUGIN_VERSION
        assert (plugin.order, plugin.values["normalization"]) == (order, normalization)
        assert plugin.values["k"] == replace(TINY, **FAMILIES[model_type][0]).num_experts_per_tok
