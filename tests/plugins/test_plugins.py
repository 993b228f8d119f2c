"""mixport IPluginV3 plugins: fields, types, formats, workspace, shapes (TensorRT, no GPU)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import pytest

from mixport.errors import PluginError
from mixport.ops import (
    MOE,
    ORDERS,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    ROUTING_PLUGIN_VERSION,
    ROUTING_PLUGIN_VERSIONS,
    TOPK_ROUTING,
)
from mixport.plugins.kernels import moe_scratch_bytes, moe_workspace_bytes

ROUTING_FIELDS = {"num_experts": 8, "k": 2, "scoring_func": "softmax", "normalization": "none",
                  "order": "topk_softmax"}
ROUTING_FIELDS_V1 = {"num_experts": 8, "k": 2, "scoring_func": "softmax", "normalization": "none"}
VERSION = {TOPK_ROUTING: ROUTING_PLUGIN_VERSION, MOE: PLUGIN_VERSION}  # what new files carry
MOE_FIELDS = {"num_experts": 8, "k": 2, "activation": "swiglu"}


@pytest.fixture(scope="module")
def trt(trt_module: ModuleType) -> ModuleType:
    from mixport.plugins.registry import register_plugins

    register_plugins(trt_module)
    return trt_module


def creator(trt: ModuleType, op: str, version: str | None = None) -> Any:
    found = trt.get_plugin_registry().get_creator(op, version or VERSION[op], PLUGIN_NAMESPACE)
    assert found is not None, f"{op}@{version or VERSION[op]} creator not registered"
    return found


def field(trt: ModuleType, name: str, value: int | str) -> Any:
    if isinstance(value, str):
        return trt.PluginField(name, np.frombuffer(value.encode(), np.int8),
                               trt.PluginFieldType.CHAR)
    return trt.PluginField(name, np.array([value], np.int32), trt.PluginFieldType.INT32)


def create(trt: ModuleType, op: str, values: dict[str, int | str], version: str | None = None) -> Any:
    """create_plugin as the ONNX parser calls it (node attributes as fields)."""
    fields = [field(trt, k, v) for k, v in values.items()]
    return creator(trt, op, version).create_plugin("node", trt.PluginFieldCollection(fields),
                                                   trt.TensorRTPhase.BUILD)


def descs(trt: ModuleType, *types: str, fmt: str = "LINEAR") -> list[Any]:
    out = []
    for name in types:
        desc = trt.DynamicPluginTensorDesc()
        desc.desc.type = getattr(trt.DataType, name)
        desc.desc.format = getattr(trt.TensorFormat, fmt)
        out.append(desc)
    return out


def test_register_is_idempotent(trt: ModuleType) -> None:
    from mixport.plugins.registry import (
        plugins_registered,
        register_plugins,
        trt_flavor,
    )

    assert register_plugins(trt) == register_plugins(trt) == [
        "mixport::TopKRouting@2", "mixport::TopKRouting@1", "mixport::MoE@1"]
    assert plugins_registered(trt)
    assert ROUTING_PLUGIN_VERSION == "2" and ROUTING_PLUGIN_VERSIONS == ("1", "2")
    for version in ROUTING_PLUGIN_VERSIONS:  # every version a file may carry has its creator
        assert creator(trt, TOPK_ROUTING, version).plugin_version == version
    assert trt.__version__ in trt_flavor(trt)


def test_creators_declare_fields(trt: ModuleType) -> None:
    """The parser passes only declared fields: version 2 declares ``order``, version 1 does not."""
    v1 = {"num_experts": trt.PluginFieldType.INT32, "k": trt.PluginFieldType.INT32,
          "scoring_func": trt.PluginFieldType.CHAR, "normalization": trt.PluginFieldType.CHAR}
    for version, expected in (("2", {**v1, "order": trt.PluginFieldType.CHAR}), ("1", v1)):
        declared = creator(trt, TOPK_ROUTING, version).field_names
        assert {declared[i].name: declared[i].type for i in range(len(declared))} == expected


@pytest.mark.parametrize(("op", "values", "version"), [
    (TOPK_ROUTING, ROUTING_FIELDS, "2"), (TOPK_ROUTING, ROUTING_FIELDS_V1, "1"), (MOE, MOE_FIELDS, "1")])
def test_fields_round_trip(trt: ModuleType, op: str, values: dict[str, int | str], version: str) -> None:
    extra = {"plugin_namespace": "mixport", "plugin_version": version}  # must be ignored
    plugin = create(trt, op, {**values, **extra}, version)
    assert plugin is not None and plugin.values == values
    assert (plugin.plugin_name, plugin.plugin_namespace, plugin.plugin_version) == (
        op, PLUGIN_NAMESPACE, version)
    # an engine stores the fields and the version; the runtime finds the same creator by them
    again = creator(trt, op, plugin.plugin_version).create_plugin(
        "node", plugin.get_fields_to_serialize(), trt.TensorRTPhase.RUNTIME)
    assert again.values == values and again.plugin_version == version
    for copy in (plugin.clone(), plugin.attach_to_context(None)):
        assert copy.values == values and copy.plugin_version == version


def test_defaults_fill_optional_fields(trt: ModuleType) -> None:
    plugin = create(trt, TOPK_ROUTING, {"num_experts": 4, "k": 1})
    assert plugin.values["normalization"] == "renormalize"
    assert plugin.values["scoring_func"] == "softmax"
    assert plugin.values["order"] == "softmax_topk" == plugin.order


@pytest.mark.parametrize("order", ORDERS)
def test_order_selects_the_kernel_mode(trt: ModuleType, order: str) -> None:
    """Version 2 computes the node's order; version 1 always softmax_topk (an ``order`` field never
    reaches it from the parser, and is ignored if it did)."""
    assert create(trt, TOPK_ROUTING, {**ROUTING_FIELDS, "order": order}).order == order
    v1 = create(trt, TOPK_ROUTING, {**ROUTING_FIELDS_V1, "order": order}, "1")
    assert v1.order == "softmax_topk" and "order" not in v1.values
    # different orders are different kernels: they must not share a timing-cache entry
    ids = {create(trt, TOPK_ROUTING, {**ROUTING_FIELDS, "order": o}).timing_cache_id for o in ORDERS}
    assert len(ids) == len(ORDERS)


@pytest.mark.parametrize("values", [{"num_experts": 4}, {"num_experts": 4, "k": 0},
                                    {"num_experts": 4, "k": 2, "normalization": "bogus"},
                                    {"num_experts": 4, "k": 2, "order": "sigmoid_topk"}])
def test_bad_fields_create_nothing(trt: ModuleType, values: dict[str, int | str]) -> None:
    assert create(trt, TOPK_ROUTING, values) is None


def test_output_types(trt: ModuleType) -> None:
    dt = trt.DataType
    routing, moe = create(trt, TOPK_ROUTING, ROUTING_FIELDS), create(trt, MOE, MOE_FIELDS)
    assert routing.num_outputs == 2 and moe.num_outputs == 1
    assert routing.get_output_data_types([dt.HALF]) == [dt.HALF, dt.INT64]
    assert moe.get_output_data_types([dt.BF16, dt.BF16, dt.INT64, dt.BF16, dt.BF16]) == [dt.BF16]


@pytest.mark.parametrize("float_type", ["FLOAT", "HALF", "BF16"])
def test_formats_accept_float_types(trt: ModuleType, float_type: str) -> None:
    routing, moe = create(trt, TOPK_ROUTING, ROUTING_FIELDS), create(trt, MOE, MOE_FIELDS)
    io = descs(trt, float_type, float_type, "INT64")
    assert all(routing.supports_format_combination(p, io, 1) for p in range(3))
    io = descs(trt, float_type, float_type, "INT64", float_type, float_type, float_type)
    assert all(moe.supports_format_combination(p, io, 5) for p in range(6))


def test_formats_reject_other_combinations(trt: ModuleType) -> None:
    routing, moe = create(trt, TOPK_ROUTING, ROUTING_FIELDS), create(trt, MOE, MOE_FIELDS)
    assert not routing.supports_format_combination(0, descs(trt, "INT8"), 1)
    assert not routing.supports_format_combination(0, descs(trt, "FLOAT", fmt="HWC"), 1)
    assert not routing.supports_format_combination(1, descs(trt, "FLOAT", "HALF"), 1)
    assert not routing.supports_format_combination(2, descs(trt, "HALF", "HALF", "INT32"), 1)
    assert not moe.supports_format_combination(2, descs(trt, "HALF", "HALF", "INT32"), 5)
    assert not moe.supports_format_combination(3, descs(trt, "HALF", "HALF", "INT64", "FLOAT"), 5)


@pytest.mark.parametrize(("trt_type", "dtype"), [("HALF", "float16"), ("FLOAT", "float32"), ("BF16", "bfloat16")])
def test_workspace_is_the_scratch_fused_moe_carves(trt: ModuleType, trt_type: str, dtype: str) -> None:
    """MoE asks for the most scratch any token count of the profile needs (fused_moe runs in it, see
    test_kernels); TopKRouting writes its outputs directly and asks for none."""
    tokens, hidden, ffn, experts, k = 100, 32, 48, 8, 2  # 200 pairs: both BLOCK_M choices (16, then 64)
    moe = create(trt, MOE, MOE_FIELDS)
    inputs = descs(trt, trt_type, trt_type, "INT64", trt_type, trt_type)
    inputs[0].max = trt.Dims([tokens, hidden])
    inputs[3].max = trt.Dims([experts, hidden, 2 * ffn])
    size = moe.get_workspace_size(inputs, descs(trt, trt_type))
    assert size == max(moe_scratch_bytes(t, hidden, ffn, experts, k, dtype) for t in range(1, tokens + 1))
    assert size == moe_workspace_bytes(tokens, hidden, ffn, experts, k, dtype) and size % 256 == 0
    routing = create(trt, TOPK_ROUTING, ROUTING_FIELDS)
    logits = descs(trt, trt_type)
    logits[0].max = trt.Dims([tokens, experts])
    assert routing.get_workspace_size(logits, descs(trt, trt_type, "INT64")) == 0


def test_enqueue_failure_is_an_exception_not_an_abort(trt: ModuleType) -> None:
    routing = create(trt, TOPK_ROUTING, ROUTING_FIELDS)
    desc = trt.PluginTensorDesc()
    desc.dims, desc.type = trt.Dims([4, 8]), trt.DataType.FLOAT
    out = trt.PluginTensorDesc()
    out.dims, out.type = trt.Dims([4, 2]), trt.DataType.FLOAT
    with pytest.raises(PluginError, match="TopKRouting enqueue failed"):
        routing.enqueue([desc], [out, out], [0], [0, 0], 0, 0)


@pytest.mark.parametrize("k", [1, 3])
def test_output_shapes_through_the_parser(trt: ModuleType, tmp_path: Any, k: int) -> None:
    from mixport.engine.network import parse_onnx
    from mixport.engine.symlink import ensure_parser_symlink
    from mixport.engine.trt_logger import make_logger
    from mixport.plugins.testing import write_tiny_moe_model

    ensure_parser_symlink()
    path = write_tiny_moe_model(tmp_path / "tiny.onnx", k=k)
    logger = make_logger(trt)
    parsed = parse_onnx(trt, trt.Builder(logger), logger, path, use_plugins=True)
    outputs = {parsed.network.get_output(i).name: parsed.network.get_output(i)
               for i in range(parsed.network.num_outputs)}
    assert tuple(outputs["weights"].shape) == (-1, k) and tuple(outputs["ids"].shape) == (-1, k)
    assert tuple(outputs["out"].shape) == (-1, 32)
    assert outputs["ids"].dtype == trt.DataType.INT64
    assert outputs["weights"].dtype == outputs["out"].dtype == trt.DataType.FLOAT
