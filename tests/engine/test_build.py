"""Engine builds of tiny seeded ONNX graphs, CPU-only with TensorRT-RTX (or full TensorRT)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest
from onnx import TensorProto

from mixport.engine.builder import build_engine
from mixport.engine.profiles import ProfileSpec, input_shapes
from mixport.engine.symlink import ParserSymlinkError, ensure_parser_symlink
from mixport.errors import BuildError
from mixport.exporter.routing_onnx import routing_function
from mixport.passes import moe_bodies
from mixport.plugins.kernels.reference import reference_moe, reference_routing
from mixport.plugins.testing import tiny_moe_model, write_tiny_moe_model

TOKENS = ProfileSpec(dims={"T": (1, 8, 64)})
PLUGINS = {"mixport::TopKRouting", "mixport::MoE"}


@pytest.fixture(scope="module")
def trt(trt_module: ModuleType) -> ModuleType:
    return trt_module


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_moe_model(tmp_path / "tiny.onnx", hidden=32, ffn=48, experts=4, k=2)


def test_plugins_become_plugin_v3_layers(trt: ModuleType, tiny: Path, tmp_path: Path) -> None:
    result = build_engine(tiny, tmp_path / "out" / "tiny.engine", dtype="fp32", profiles=TOKENS)
    assert {layer.plugin for layer in result.plugin_layers} == PLUGINS
    assert [layer.name for layer in result.plugin_layers] == ["routing", "moe"]
    assert result.engine_path.stat().st_size == result.engine_bytes > 0
    assert result.profile == {"hidden": ((1, 32), (8, 32), (64, 32))}
    assert result.dtype == "fp32" and result.use_plugins
    assert os.listdir(tmp_path / "out") == ["tiny.engine"]  # no temp file left behind


def test_without_plugins_the_function_bodies_are_inlined(trt: ModuleType, tiny: Path,
                                                        tmp_path: Path) -> None:
    from mixport.plugins.registry import register_plugins

    register_plugins(trt)  # registered, yet use_plugins=False must not use them
    result = build_engine(tiny, tmp_path / "dense.engine", profiles=TOKENS, use_plugins=False)
    types = Counter(layer.type for layer in result.layers)
    assert not result.plugin_layers and "PLUGIN_V3" not in types
    # the layers are the shipped bodies' (routing_onnx.routing_function, moe_bodies' dense body):
    # one matrix multiply per MatMul they declare (+ the router's), a TopK, and nothing that
    # the parser rejects (NonZero, Scatter)
    model = tiny_moe_model()
    declared = Counter(n.op_type for f in model.functions for n in f.node)
    assert {f.name: len(f.node) for f in model.functions} == {
        "TopKRouting": len(routing_function(2, "renormalize", TensorProto.FLOAT).node),
        "MoE": len(moe_bodies.moe_function("dense", 4, 2, 48).node)}
    assert declared["MatMul"] == 2 and declared["TopK"] == 1
    assert types["MATRIX_MULTIPLY"] == declared["MatMul"] + 1 and types["TOPK"] == declared["TopK"]
    assert not {"NON_ZERO", "SCATTER", "EINSUM", "ONE_HOT"} & set(types)
    assert result.engine_path.stat().st_size > 0


def test_tiny_model_computes_the_contract() -> None:
    """The tiny model's bodies (run by ONNX Runtime) match the numpy oracle: it tests the real op."""
    import numpy as np
    import onnxruntime as ort
    from onnx import numpy_helper

    model = tiny_moe_model(hidden=32, ffn=48, experts=4, k=2)
    hidden = np.random.default_rng(1).standard_normal((9, 32)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out, weights, ids = session.run(["out", "weights", "ids"], {"hidden": hidden})
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    want_w, want_ids = reference_routing(hidden @ inits["router"], 2)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_w, rtol=1e-5, atol=1e-6)
    want = reference_moe(hidden, want_w, want_ids, inits["gate_up"], inits["down"])
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_missing_plugin_attributes_are_added(trt: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "bare.onnx"
    write_tiny_moe_model(path, plugin_attrs=False)
    result = build_engine(path, tmp_path / "bare.engine", profiles=TOKENS)
    assert {layer.plugin for layer in result.plugin_layers} == PLUGINS


def test_rebuild_replaces_the_engine(trt: ModuleType, tiny: Path, tmp_path: Path) -> None:
    engine = tmp_path / "e.engine"
    engine.write_bytes(b"stale")
    build_engine(tiny, engine, profiles=TOKENS)
    assert engine.read_bytes() != b"stale" and len(os.listdir(tmp_path)) == 2


def test_rtx_targets_expand_and_pin(rtx_module: ModuleType, tiny: Path, tmp_path: Path) -> None:
    """Named SM targets are a TensorRT-RTX feature: built with RTX even where full TensorRT is installed."""
    default = build_engine(tiny, tmp_path / "a.engine", profiles=TOKENS)
    assert "sm80" in default.targets and all(int(t[2:]) >= 80 for t in default.targets)
    pinned = build_engine(tiny, tmp_path / "b.engine", targets="SM89", profiles=TOKENS)
    assert pinned.targets == ("sm89",)


def _llm_model() -> object:
    """input_ids/attention_mask/position_ids/past kv in, present kv out (KVH 2, D 8)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    emb = numpy_helper.from_array(np.ones((16, 16), np.float32), "emb")
    shape = numpy_helper.from_array(np.array([0, 0, 2, 8], np.int64), "shape")
    n = helper.make_node
    nodes = [n("Gather", ["emb", "input_ids"], ["e"]), n("Reshape", ["e", "shape"], ["r"]),
             n("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3]),
             n("Concat", ["past_key_values.0.key", "t"], ["present.0.key"], axis=2),
             n("ReduceSum", ["attention_mask"], ["mask_sum"]),
             n("ReduceSum", ["position_ids"], ["pos_sum"])]
    io = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "llm", [
        io("input_ids", TensorProto.INT64, ["batch", "seq"]),
        io("attention_mask", TensorProto.INT64, ["batch", "past+seq"]),
        io("position_ids", TensorProto.INT64, ["batch", "seq"]),
        io("past_key_values.0.key", TensorProto.FLOAT, ["batch", 2, "past", 8])], [
        io("present.0.key", TensorProto.FLOAT, ["batch", 2, "total", 8]),
        io("mask_sum", TensorProto.INT64, []), io("pos_sum", TensorProto.INT64, [])],
        [emb, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_kv_cache_llm_profile(trt: ModuleType, tmp_path: Path) -> None:
    import onnx

    onnx.save(_llm_model(), str(tmp_path / "llm.onnx"))
    spec = ProfileSpec(batch=(1, 2, 4), seq=(1, 16, 128), past=(0, 64, 512))
    result = build_engine(tmp_path / "llm.onnx", tmp_path / "llm.engine", profiles=spec)
    assert result.profile == {
        "input_ids": ((1, 1), (2, 16), (4, 128)),
        "attention_mask": ((1, 1), (2, 80), (4, 640)),
        "position_ids": ((1, 1), (2, 16), (4, 128)),
        "past_key_values.0.key": ((1, 2, 0, 8), (2, 2, 64, 8), (4, 2, 512, 8))}
    assert result.engine_bytes > 0


def test_profile_rules_without_tensorrt() -> None:
    spec = ProfileSpec()
    assert input_shapes(spec, "past_key_values.3.value", (-1, 8, -1, 128), []) == (
        (1, 8, 0, 128), (1, 8, 256, 128), (4, 8, 1024, 128))
    assert input_shapes(spec, "x", (-1, 4), ["batch_size"]) == ((1, 4), (1, 4), (4, 4))
    with pytest.raises(BuildError, match=r"ProfileSpec\(dims=\{'T'"):
        input_shapes(spec, "hidden", (-1, 32), ["T"])
    with pytest.raises(BuildError, match="bad profile range for seq"):
        ProfileSpec(seq=(8, 4, 16)).check()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dtype": "int8"}, "unsupported dtype; given: int8; expected: fp32, fp16, bf16"),
    ({"dtype": "fp16"}, "requested dtype differs from the ONNX file's"),
    ({"targets": ["sm999"]}, "unsupported build target"),
    ({"targets": ["current", "ampere+"]}, "'current' cannot be combined"),
    ({"profiles": ProfileSpec()}, "no profile range for dynamic axis 0 of input 'hidden'"),
])
def test_clear_errors(trt: ModuleType, tiny: Path, tmp_path: Path, kwargs: dict,
                      message: str) -> None:
    kwargs = {"profiles": TOKENS, **kwargs}
    with pytest.raises(BuildError, match=message.replace("(", r"\(")):
        build_engine(tiny, tmp_path / "x.engine", **kwargs)
    assert not (tmp_path / "x.engine").exists()


def test_missing_onnx_file(trt: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="ONNX file not found"):
        build_engine(tmp_path / "nope.onnx", tmp_path / "x.engine")


def test_parse_failure_carries_the_reason(trt: ModuleType, tmp_path: Path) -> None:
    import onnx

    model = tiny_moe_model()
    next(a for a in model.graph.node[2].attribute if a.name == "activation").s = b"gelu"
    onnx.save(model, str(tmp_path / "gelu.onnx"))
    with pytest.raises(BuildError, match="could not parse.*unsupported activation"):
        build_engine(tmp_path / "gelu.onnx", tmp_path / "x.engine", profiles=TOKENS)
    del model.functions[:]  # no bodies and no plugins: nothing can import the nodes
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(BuildError, match="could not parse.*function bodies"):
        build_engine(tmp_path / "bare.onnx", tmp_path / "x.engine", profiles=TOKENS,
                     use_plugins=False)


def test_symlink_is_created_once(tmp_path: Path) -> None:
    (tmp_path / "libtensorrt_rtx.so.1").write_bytes(b"")
    link = ensure_parser_symlink(tmp_path)
    assert link == tmp_path / "libtensorrt_rtx.so" and os.readlink(link) == "libtensorrt_rtx.so.1"
    assert ensure_parser_symlink(tmp_path) == link
    assert ensure_parser_symlink(tmp_path / "empty") is None


def test_symlink_error_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "libtensorrt_rtx.so.1").write_bytes(b"")

    def refuse(src: str, dst: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "symlink", refuse)
    with pytest.raises(ParserSymlinkError, match=r"ln -s .*libtensorrt_rtx\.so\.1 .*rtx\.so"):
        ensure_parser_symlink(tmp_path)


def test_installed_rtx_has_the_link(rtx_module: ModuleType) -> None:
    link = ensure_parser_symlink()
    assert link is not None and link.exists()


def test_field_shape_mismatch_is_a_build_error(trt: ModuleType, tmp_path: Path) -> None:
    import onnx

    model = tiny_moe_model(experts=4)
    next(a for a in model.graph.node[2].attribute if a.name == "num_experts").i = 6
    onnx.save(model, str(tmp_path / "six.onnx"))
    expected = "could not build.*gate_up experts .* given: 4; expected: 6"
    with pytest.raises(BuildError, match=expected):
        build_engine(tmp_path / "six.onnx", tmp_path / "x.engine", profiles=TOKENS)


def _routing_plugin(trt: ModuleType, path: Path) -> object:
    """The Python plugin object the parser created for the file's TopKRouting node."""
    from mixport.engine.network import parse_onnx
    from mixport.engine.trt_logger import make_logger

    logger = make_logger(trt)
    network = parse_onnx(trt, trt.Builder(logger), logger, path, use_plugins=True).network
    layer = next(network.get_layer(i) for i in range(network.num_layers) if network.get_layer(i).name == "routing")
    layer.__class__ = trt.IPluginV3Layer
    return layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)


@pytest.mark.parametrize("plugin_attrs", [True, False])
@pytest.mark.parametrize(("order", "version"), [(None, "1"), ("softmax_topk", "2"), ("topk_softmax", "2")])
def test_both_routing_versions_build_plugin_layers(trt: ModuleType, tmp_path: Path, order: str | None,
                                                   version: str, plugin_attrs: bool) -> None:
    """A version-1 file (no ``order``) and version-2 files each become their version's plugin layer,
    the node's order reaching the plugin as the kernel mode (version 1: softmax_topk); attributes
    added when missing follow the node (``order`` present: version 2)."""
    path = write_tiny_moe_model(tmp_path / "m.onnx", order=order, normalization="none", plugin_attrs=plugin_attrs)
    result = build_engine(path, tmp_path / "m.engine", profiles=TOKENS)
    assert [(layer.plugin, layer.version) for layer in result.plugin_layers] == [
        ("mixport::TopKRouting", version), ("mixport::MoE", "1")]
    plugin = _routing_plugin(trt, path)
    assert plugin.plugin_version == version and plugin.order == (order or "softmax_topk")
    assert plugin.values["normalization"] == "none" and plugin.values.get("order") == order


@pytest.mark.parametrize(("attrs", "message"), [
    ({"plugin_version": "4"},
     "TopKRouting node 'routing' has an unknown plugin_version; given: 4; expected: 1 | 2 | 3"),
    ({"plugin_version": "1", "order": "topk_softmax"},
     "TopKRouting node 'routing' has plugin_version '1', which has no order; given: order='topk_softmax'"),
])
def test_routing_version_mismatch_is_refused(trt: ModuleType, tmp_path: Path, attrs: dict[str, str],
                                            message: str) -> None:
    """A node no creator computes faithfully is refused before parsing, not built wrong."""
    import onnx

    model = tiny_moe_model(order="topk_softmax")
    for a in model.graph.node[1].attribute:
        if a.name in attrs:
            a.s = attrs[a.name].encode()
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(BuildError, match=message.replace("|", r"\|").replace("(", r"\(")):
        build_engine(tmp_path / "bad.onnx", tmp_path / "x.engine", profiles=TOKENS)
    assert not (tmp_path / "x.engine").exists()
    build_engine(tmp_path / "bad.onnx", tmp_path / "x.engine", profiles=TOKENS, use_plugins=False)  # bodies: fine
