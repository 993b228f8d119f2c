"""Parse an ONNX file into a TensorRT network, with or without the mixport plugins.

The parser builds a plugin layer for a mixport node when the node carries
``plugin_namespace="mixport"`` and the creator of its ``plugin_version`` is
registered; otherwise it inlines the node's ONNX function body. TopKRouting
nodes carry version "2" (with ``order``) or "1" (files written before it; no
``order``): both have a creator; a node whose version and attributes disagree,
or whose version this mixport does not know, is refused before parsing. The parser's plugin-override flag does
not change that for namespaced creators, so this module sets (use_plugins) or
strips (no plugins) the attribute on an in-memory copy of the graph; weights
stay external and are read from beside the file.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from mixport.errors import BuildError
from mixport.ops import (
    BIAS_PLUGIN_VERSION,
    DOMAIN,
    MOE,
    MOE_PLUGIN_VERSIONS,
    ORDERS,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    QUANT_PLUGIN_VERSION,
    ROUTING_PLUGIN_VERSION,
    ROUTING_PLUGIN_VERSIONS,
    TOPK_ROUTING,
)

_PLUGIN_ATTRS = ("plugin_namespace", "plugin_version")


@dataclass(frozen=True)
class LayerInfo:
    """One layer of the parsed network: its name, LayerType name and plugin id if any."""

    name: str
    type: str
    plugin: str | None = None  # "namespace::name" for plugin layers
    version: str | None = None  # the plugin's version ("1", "2") for plugin layers


@dataclass
class ParsedNetwork:
    """The network and the objects that must outlive it until the build is done."""

    network: Any
    parser: Any
    dim_params: dict[str, list[str | None]]
    mixport_nodes: int


def load_onnx(path: Path) -> Any:
    """The ModelProto of ``path`` without external weights (cheap even for big models)."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise BuildError("cannot read the ONNX file", given=str(path),
                         expected="a valid .onnx model", hint=str(exc)) from exc


def input_dim_params(model: Any) -> dict[str, list[str | None]]:
    """{graph input: [dim_param or None per axis]}."""
    return {vi.name: [d.dim_param or None for d in vi.type.tensor_type.shape.dim]
            for vi in model.graph.input}


def _string_attrs(node: Any) -> dict[str, str]:
    from onnx import AttributeProto

    return {a.name: a.s.decode() for a in node.attribute if a.type == AttributeProto.STRING}


def plugin_version_of(node: Any) -> str:
    """The plugin version a mixport node asks for: its ``plugin_version``, or when it has none the
    version its attributes describe (TopKRouting: "2" with an ``order`` attribute, else "1";
    MoE: "2" with ``bits`` (quantized experts), else "1")."""
    attrs = _string_attrs(node)
    if "plugin_version" in attrs:
        return attrs["plugin_version"]
    return _described(node)


def _described(node: Any) -> str:
    """The plugin version a mixport node's inputs and attributes need."""
    attrs = _string_attrs(node)
    if node.op_type == TOPK_ROUTING:
        v3 = {"n_group", "topk_group", "group_score", "routed_scaling_factor", "sparsemixer_eps"}
        if len(node.input) > 1 or any(a.name in v3 for a in node.attribute) or \
                attrs.get("scoring_func", "softmax") != "softmax":
            return ROUTING_PLUGIN_VERSION
        return "2" if "order" in attrs else "1"
    return QUANT_PLUGIN_VERSION if any(a.name == "bits" for a in node.attribute) else PLUGIN_VERSION


def check_plugin_version(node: Any) -> None:
    """BuildError when no mixport creator computes what the node says (unknown version, or a
    version-1 TopKRouting with an ``order`` other than the one version 1 computes)."""
    version, attrs = plugin_version_of(node), _string_attrs(node)
    known = ROUTING_PLUGIN_VERSIONS if node.op_type == TOPK_ROUTING else MOE_PLUGIN_VERSIONS
    if version not in known:
        raise BuildError(f"mixport::{node.op_type} node '{node.name}' has an unknown plugin_version",
                         given=version, expected=" | ".join(known),
                         hint="the file was written by a newer mixport: upgrade mixport, or build --no-plugins")
    if node.op_type == TOPK_ROUTING and version == "1" and attrs.get("order", ORDERS[0]) != ORDERS[0]:
        raise BuildError(f"mixport::TopKRouting node '{node.name}' has plugin_version '1', which has no order",
                         given=f"order={attrs['order']!r}", expected=f"plugin_version '{ROUTING_PLUGIN_VERSION}'",
                         hint="re-export the model with this mixport")
    if node.op_type == TOPK_ROUTING and version in ("1", "2") and _described(node) == ROUTING_PLUGIN_VERSION:
        raise BuildError(f"mixport::TopKRouting node '{node.name}' has plugin_version '{version}', which has no "
                         "selection bias, sigmoid / sparsemixer scoring, groups or scaling", given=version,
                         expected=f"plugin_version '{ROUTING_PLUGIN_VERSION}'",
                         hint="re-export the model with this mixport")
    quantized = any(a.name == "bits" for a in node.attribute)
    if node.op_type == MOE and version == BIAS_PLUGIN_VERSION:
        if quantized:
            raise BuildError(f"mixport::MoE node '{node.name}': quantized experts with biases (plugin_version "
                             f"'{BIAS_PLUGIN_VERSION}') have no TensorRT plugin",
                             given=f"{len(node.input)} inputs, bits",
                             expected="float experts with biases (7 inputs)",
                             hint="build --no-plugins (its function body), or export without --quantize")
        return
    quantized = quantized or len(node.input) > 5
    if node.op_type == MOE and quantized != (version == QUANT_PLUGIN_VERSION):
        raise BuildError(f"mixport::MoE node '{node.name}' has plugin_version '{version}'",
                         given=f"{len(node.input)} inputs" + (", bits" if quantized else ""),
                         expected=f"plugin_version '{QUANT_PLUGIN_VERSION}' for quantized experts (bits, scales), "
                                  f"'{PLUGIN_VERSION}' for float experts (5 inputs)",
                         hint="re-export the model with this mixport")


def set_plugin_attrs(model: Any, use_plugins: bool) -> tuple[int, int]:
    """Add (or strip) the plugin attributes on mixport nodes; returns (nodes, changes).

    With plugins, each node's version is checked (``check_plugin_version``) and a missing
    ``plugin_version`` is set to the one ``plugin_version_of`` reads from its attributes."""
    from onnx import helper

    nodes = changes = 0
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type not in (TOPK_ROUTING, MOE):
            continue
        nodes += 1
        present = {a.name: i for i, a in enumerate(node.attribute)}
        if use_plugins:
            check_plugin_version(node)
            wanted = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": plugin_version_of(node)}
        for name in _PLUGIN_ATTRS:
            if use_plugins and name not in present:
                node.attribute.append(helper.make_attribute(name, wanted[name]))
                changes += 1
            elif not use_plugins and name in present:
                del node.attribute[[a.name for a in node.attribute].index(name)]
                changes += 1
    return nodes, changes


@contextlib.contextmanager
def collect_plugin_errors(messages: list[str]) -> Iterator[None]:
    """Collect the errors mixport plugins log (they reach TensorRT only as codes)."""

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, logger = _Keep(logging.ERROR), logging.getLogger("mixport.plugins")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _parser_errors(parser: Any) -> list[str]:
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = f"node {err.node()} ({err.node_name()}, {err.node_operator()})"
        errors.append(f"{where}: {err.desc()}")
    return errors


def _quantized_for_trt(model: Any, base_dir: Path, use_plugins: bool) -> tuple[Any, int]:
    """Quantized weights as TensorRT takes them (``quant_inputs``): with plugins, the quantized MoE
    nodes' INT4/UINT4 initializers re-typed as INT8 bytes; without, the dequantizing bodies inlined;
    both: UINT4 + zero-point dequantization rewritten to INT8. (model, changes)."""
    from mixport.engine import quant_inputs

    changes = quant_inputs.retype_quant_inputs(model, base_dir) if use_plugins else 0
    if not use_plugins:
        inlined = quant_inputs.inline_quantized_bodies(model)
        changes += inlined is not model
        model = inlined
    return model, changes + quant_inputs.zero_points_to_int8(model, base_dir)


def parse_onnx(trt: ModuleType, builder: Any, logger: Any, path: Path,
               use_plugins: bool) -> ParsedNetwork:
    """A strongly typed network parsed from ``path``; BuildError with the parser's text."""
    from mixport import onnx_io

    model = load_onnx(path)
    onnx_io.check_external_locations(path, model)  # before the parser reads any external data
    mixport_nodes, changes = set_plugin_attrs(model, use_plugins)
    model, quant_changes = _quantized_for_trt(model, path.parent, use_plugins)
    changes += quant_changes
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    plugin_messages: list[str] = []
    with collect_plugin_errors(plugin_messages):
        if changes:
            ok = parser.parse(model.SerializeToString(), str(path))
        else:
            ok = parser.parse_from_file(str(path))
    if not ok:
        errors = "; ".join(plugin_messages + _parser_errors(parser)) or "no error reported"
        hint = ("check the mixport node attributes against mixport/ops.py"
                if use_plugins and mixport_nodes else
                "without plugins, mixport nodes need their ONNX function bodies"
                if mixport_nodes else None)
        raise BuildError(f"TensorRT could not parse the ONNX file: {errors}",
                         given=str(path), hint=hint)
    return ParsedNetwork(network, parser, input_dim_params(model), mixport_nodes)


def _plugin_id(trt: ModuleType, layer: Any) -> tuple[str | None, str | None]:
    """("namespace::name", version) of a plugin layer; (None, None) for a C++ plugin."""
    try:
        layer.__class__ = trt.IPluginV3Layer
        core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
        return f"{core.plugin_namespace}::{core.plugin_name}", str(core.plugin_version)
    except (AttributeError, TypeError, RuntimeError):  # C++ plugin: no Python core
        return None, None


def list_layers(trt: ModuleType, network: Any) -> tuple[LayerInfo, ...]:
    """Every layer of ``network`` with its type; plugin layers carry their plugin id."""
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = layer.type
        plugin, version = _plugin_id(trt, layer) if kind == trt.LayerType.PLUGIN_V3 else (None, None)
        layers.append(LayerInfo(layer.name, kind.name, plugin, version))
    return tuple(layers)
