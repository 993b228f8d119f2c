"""mixport IPluginV3 plugins: fields, types, formats, workspace, shapes (TensorRT, no GPU)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import pytest

from mixport.errors import PluginError
from mixport.ops import (
    MOE,
    MOE_PLUGIN_VERSIONS,
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
ROUTING_FIELDS_V3 = {**ROUTING_FIELDS, "scoring_func": "sigmoid", "n_group": 4, "topk_group": 2,
                     "group_score": "top2_sum", "routed_scaling_factor": 2.5, "sparsemixer_eps": 0.0}
MOE_FIELDS = {"num_experts": 8, "k": 2, "activation": "swiglu"}
MOE_FIELDS_V2 = {**MOE_FIELDS, "bits": 4, "block_size": 32}


@pytest.fixture(scope="module")
def trt(trt_module: ModuleType) -> ModuleType:
    from mixport.plugins.registry import register_plugins

    register_plugins(trt_module)
    return trt_module


def creator(trt: ModuleType, op: str, version: str | None = None) -> Any:
    found = trt.get_plugin_registry().get_creator(op, version or VERSION[op], PLUGIN_NAMESPACE)
    assert found is not None, f"{op}@{version or VERSION[op]} creator not registered"
    return found


def field(trt: ModuleType, name: str, value: int | float | str) -> Any:
    if isinstance(value, str):
        return trt.PluginField(name, np.frombuffer(value.encode(), np.int8),
                               trt.PluginFieldType.CHAR)
    if isinstance(value, float):
        return trt.PluginField(name, np.array([value], np.float32), trt.PluginFieldType.FLOAT32)
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
        "mixport::TopKRouting@3", "mixport::TopKRouting@2", "mixport::TopKRouting@1", "mixport::MoE@1",
        "mixport::MoE@2", "mixport::MoE@3"]
    assert plugins_registered(trt)
    assert ROUTING_PLUGIN_VERSION == "3" and ROUTING_PLUGIN_VERSIONS == ("1", "2", "3")
    for version in ROUTING_PLUGIN_VERSIONS:  # every version a file may carry has its creator
        assert creator(trt, TOPK_ROUTING, version).plugin_version == version
    assert trt.__version__ in trt_flavor(trt)
    for version in MOE_PLUGIN_VERSIONS:
        assert creator(trt, MOE, version).plugin_version == version


def test_creators_declare_fields(trt: ModuleType) -> None:
    """The parser passes only declared fields: version 3 declares the groups, scaling and eps (floats as
    FLOAT32), version 2 ``order``, version 1 neither."""
    v1 = {"num_experts": trt.PluginFieldType.INT32, "k": trt.PluginFieldType.INT32,
          "scoring_func": trt.PluginFieldType.CHAR, "normalization": trt.PluginFieldType.CHAR}
    v2 = {**v1, "order": trt.PluginFieldType.CHAR}
    v3 = {**v2, "n_group": trt.PluginFieldType.INT32, "topk_group": trt.PluginFieldType.INT32,
          "group_score": trt.PluginFieldType.CHAR, "routed_scaling_factor": trt.PluginFieldType.FLOAT32,
          "sparsemixer_eps": trt.PluginFieldType.FLOAT32}
    for version, expected in (("3", v3), ("2", v2), ("1", v1)):
        declared = creator(trt, TOPK_ROUTING, version).field_names
        assert {declared[i].name: declared[i].type for i in range(len(declared))} == expected


@pytest.mark.parametrize(("op", "values", "version"), [
    (TOPK_ROUTING, ROUTING_FIELDS_V3, "3"), (TOPK_ROUTING, ROUTING_FIELDS, "2"),
    (TOPK_ROUTING, ROUTING_FIELDS_V1, "1"), (MOE, MOE_FIELDS, "1"), (MOE, MOE_FIELDS_V2, "2")])
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


# -- MoE version 2: quantized experts ------------------------------------------------------------

def quant_descs(trt: ModuleType, float_type: str, zero: bool, weight_type: str = "INT8") -> list[Any]:
    """hidden, weights, ids, gate_up, down, scales [, zeros], out as version 2 takes them."""
    types = [float_type, float_type, "INT64", weight_type, weight_type, float_type, float_type]
    return descs(trt, *types, *([weight_type] * 2 if zero else []), float_type)


@pytest.mark.parametrize("float_type", ["FLOAT", "HALF", "BF16"])
@pytest.mark.parametrize(("bits", "zero"), [(8, False), (4, False), (4, True)])
def test_quantized_moe_formats(trt: ModuleType, float_type: str, bits: int, zero: bool) -> None:
    """Weights and zero points are INT8 (values, or int4 packed two per byte: TensorRT has no INT4
    or UINT8 plugin tensors); scales and the output follow hidden."""
    moe = create(trt, MOE, {**MOE_FIELDS_V2, "bits": bits}, "2")
    io = quant_descs(trt, float_type, zero)
    n = len(io) - 1
    assert all(moe.supports_format_combination(p, io, n) for p in range(len(io)))
    for bad in ("INT4", "UINT8", "INT32", float_type):
        assert not moe.supports_format_combination(3, quant_descs(trt, float_type, zero, bad), n)
    wrong_scale = quant_descs(trt, float_type, zero)
    wrong_scale[5] = descs(trt, "FLOAT" if float_type != "FLOAT" else "HALF")[0]
    assert not moe.supports_format_combination(5, wrong_scale, n)


def test_quantized_moe_refuses_zero_points_with_int8_and_bad_fields(trt: ModuleType) -> None:
    moe8 = create(trt, MOE, {**MOE_FIELDS_V2, "bits": 8}, "2")
    assert not moe8.supports_format_combination(0, quant_descs(trt, "HALF", True), 9)
    assert not create(trt, MOE, MOE_FIELDS_V2, "2").supports_format_combination(0, descs(trt, "HALF"), 5)
    for bad in ({"bits": 2}, {"block_size": 48}, {"block_size": 8}):
        assert create(trt, MOE, {**MOE_FIELDS_V2, **bad}, "2") is None
    assert create(trt, MOE, MOE_FIELDS, "2") is None  # bits and block_size are required
    ids = {create(trt, MOE, {**MOE_FIELDS_V2, "block_size": b}, "2").timing_cache_id for b in (32, 64)}
    assert len(ids) == 2  # another block size is another kernel


def _configure(trt: ModuleType, plugin: Any, shapes: list[tuple[int, ...]], float_type: str = "HALF") -> None:
    inputs = quant_descs(trt, float_type, len(shapes) == 9)[:-1]
    for desc, shape in zip(inputs, shapes, strict=True):
        desc.desc.dims = trt.Dims(list(shape))
    plugin.configure_plugin(inputs, descs(trt, float_type))


def test_quantized_moe_shape_checks(trt: ModuleType) -> None:
    """T=-1 (dynamic), E=8, H=80, F=45, B=32: int4 rows are ceil(45/2)*2 = 46 and ceil(80/2) = 40 bytes."""
    t, e, h, f = -1, 8, 80, 45
    int4 = [(t, h), (t, 2), (t, 2), (e, h, 46), (e, f, 40), (e, 3, 2 * f), (e, 2, h)]
    zeros = [(e, 3, 46), (e, 2, 40)]
    _configure(trt, create(trt, MOE, MOE_FIELDS_V2, "2"), int4)
    _configure(trt, create(trt, MOE, MOE_FIELDS_V2, "2"), int4 + zeros)
    int8 = [(t, h), (t, 2), (t, 2), (e, h, 2 * f), (e, f, h), (e, 3, 2 * f), (e, 2, h)]
    _configure(trt, create(trt, MOE, {**MOE_FIELDS_V2, "bits": 8}, "2"), int8)
    for pos, shape, what in [(3, (e, h, 2 * f), "gate_up columns"), (5, (e, 2, 2 * f), "gate_up_scale blocks"),
                             (6, (e, 2, h + 1), "down_scale hidden"), (4, (e, f, 80), "down columns")]:
        broken = list(int4)
        broken[pos] = shape
        with pytest.raises(PluginError, match=what):
            _configure(trt, create(trt, MOE, MOE_FIELDS_V2, "2"), broken)
    with pytest.raises(PluginError, match="down_zero blocks"):
        _configure(trt, create(trt, MOE, MOE_FIELDS_V2, "2"), int4 + [zeros[0], (e, 3, 40)])


def test_quantized_moe_workspace(trt: ModuleType) -> None:
    """The same scratch as the float plugin's: F is read from gate_up_scale (packed weights hide it)."""
    tokens, hidden, ffn, experts = 100, 80, 45, 8
    moe = create(trt, MOE, MOE_FIELDS_V2, "2")
    inputs = quant_descs(trt, "HALF", False)[:-1]
    inputs[0].max = trt.Dims([tokens, hidden])
    inputs[5].max = trt.Dims([experts, 3, 2 * ffn])
    size = moe.get_workspace_size(inputs, descs(trt, "HALF"))
    assert size == moe_workspace_bytes(tokens, hidden, ffn, experts, 2, "float16") > 0


def test_version_3_routing_fields_and_bias_input(trt: ModuleType) -> None:
    """Version 3 takes sigmoid / sparsemixer scoring (versions 1 and 2: softmax only), float fields, and
    the selection bias as a second float input (any float type; weights still follow the logits)."""
    assert create(trt, TOPK_ROUTING, {**ROUTING_FIELDS, "scoring_func": "sigmoid"}, "2") is None
    plugin = create(trt, TOPK_ROUTING, {**ROUTING_FIELDS_V3, "routed_scaling_factor": 16.0})
    assert plugin.values["routed_scaling_factor"] == 16.0 and plugin.values["group_score"] == "top2_sum"
    assert create(trt, TOPK_ROUTING, {**ROUTING_FIELDS_V3, "routed_scaling_factor": -1.0}) is None
    io = descs(trt, "HALF", "FLOAT", "HALF", "INT64")  # logits fp16, bias fp32, weights, ids
    assert all(plugin.supports_format_combination(p, io, 2) for p in range(4))
    assert not plugin.supports_format_combination(2, descs(trt, "HALF", "FLOAT", "FLOAT"), 2)


# -- MoE version 3: expert biases + the clamped SwiGLU (GPT-OSS) ------------------------------------

MOE_FIELDS_V3 = {**MOE_FIELDS, "activation": "swiglu_clamped", "alpha": 1.702, "limit": 7.0}


def float_field(trt: ModuleType, name: str, value: float) -> Any:
    return trt.PluginField(name, np.array([value], np.float32), trt.PluginFieldType.FLOAT32)


def test_biased_moe_fields_formats_and_shapes(trt: ModuleType) -> None:
    """Version 3: alpha / limit as FLOAT32 fields (round trip), seven inputs of hidden's type (ids
    INT64), bias shapes checked; a quantized version-3 node (9+ inputs) finds no format."""
    fields = [field(trt, k, v) for k, v in MOE_FIELDS.items() if k != "activation"]
    fields += [field(trt, "activation", "swiglu_clamped"), float_field(trt, "alpha", 1.5),
               float_field(trt, "limit", 2.5)]
    moe = creator(trt, MOE, "3").create_plugin("node", trt.PluginFieldCollection(fields), trt.TensorRTPhase.BUILD)
    assert moe.values == {**MOE_FIELDS_V3, "alpha": 1.5, "limit": 2.5} and moe.plugin_version == "3"
    again = creator(trt, MOE, "3").create_plugin("node", moe.get_fields_to_serialize(), trt.TensorRTPhase.RUNTIME)
    assert again.values == moe.values
    for float_type in ("FLOAT", "HALF"):
        io = descs(trt, float_type, float_type, "INT64", float_type, float_type, float_type, float_type, float_type)
        assert all(moe.supports_format_combination(p, io, 7) for p in range(8))
    wrong = descs(trt, "HALF", "HALF", "INT64", "HALF", "HALF", "FLOAT", "HALF", "HALF")
    assert not moe.supports_format_combination(5, wrong, 7)
    assert not moe.supports_format_combination(0, quant_descs(trt, "HALF", False), 7 + 2)
    e, h, f = 8, 80, 45
    shapes = [(-1, h), (-1, 2), (-1, 2), (e, h, 2 * f), (e, f, h), (e, 2 * f), (e, h)]
    inputs = descs(trt, *["HALF"] * 7)
    inputs[2] = descs(trt, "INT64")[0]
    for desc, shape in zip(inputs, shapes, strict=True):
        desc.desc.dims = trt.Dims(list(shape))
    moe.configure_plugin(inputs, descs(trt, "HALF"))
    inputs[6].desc.dims = trt.Dims([e, h + 1])
    with pytest.raises(PluginError, match="down_bias hidden"):
        moe.configure_plugin(inputs, descs(trt, "HALF"))


def test_quantized_biased_moe_is_refused_at_build_with_one_line() -> None:
    from onnx import helper

    from mixport.engine.network import check_plugin_version
    from mixport.errors import BuildError

    node = helper.make_node(MOE, [f"i{n}" for n in range(9)], ["out"], name="moe", domain="mixport", bits=4,
                            block_size=32, plugin_version="3")
    with pytest.raises(BuildError, match="quantized experts with biases") as info:
        check_plugin_version(node)
    assert "\n" not in str(info.value) and "--no-plugins" in str(info.value)
    check_plugin_version(helper.make_node(MOE, [f"i{n}" for n in range(7)], ["out"], plugin_version="3"))
