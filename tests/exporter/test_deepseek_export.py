"""DeepSeek-V2 and DeepSeek-V3 through `mixport export` (issue 13's "done when", export side).

One tiny Hugging Face folder per family, written by transformers' own classes and exported once per
session through the CLI. Each config exercises what the family adds: MLA (V2: a plain q_proj, RoPE in
interleaved pairs, YaRN with mscale != mscale_all_dim so both the cos/sin factor and the softmax scale
move; V3: q LoRA, rope_interleave), a dense first layer (first_k_dense_replace 1), ungated shared experts
(V2: two, V3: one), grouped routing with topk_group < n_group (V2: softmax, groups by their best,
x routed_scaling_factor, no renormalisation; V3: sigmoid, random non-zero e_score_correction_bias, groups
by their two best, renormalised, x 2.5). The written model.onnx runs in a plain
``onnxruntime.InferenceSession`` against transformers' model (prefill + 32 greedy steps, batch 2, left
padding), each MoE layer is one TopKRouting + one MoE node, the manifest records the cache tensors'
shapes (k and v differ), routing the trace never saw is right, and `mixport check` / `mixport run` work.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from mixport import artifact, ops
from mixport.exporter.config import load_config
from mixport.exporter.tiny import write_tiny
from mixport.models import MoEConfig, registry
from tests.conftest import tiny_config
from tests.exporter import parity
from tests.helpers import invoke, require_module

require_module("transformers")

MLA = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=8, kv_lora_rank=24,
           qk_nope_head_dim=12, v_head_dim=10, num_hidden_layers=3, intermediate_size=24, num_local_experts=8,
           dense_layers=(0,), dense_intermediate_size=56, rope_theta=1e4, max_position_embeddings=256)
YARN = dict(rope_type="yarn", rope_factor=4.0, rope_original_max=64, rope_mscale=1.0, rope_mscale_all_dim=0.8)
CONFIGS = {
    "deepseek_v2": dict(**MLA, **YARN, rope_layout="pairs", num_experts_per_tok=2, shared_expert_intermediate_size=48,
                        normalization="none", n_group=4, topk_group=2, group_score="max", routed_scaling_factor=1.5),
    "deepseek_v3": dict(**MLA, q_lora_rank=16, rope_layout="pairs_to_half", num_experts_per_tok=3,
                        shared_expert_intermediate_size=24, normalization="renormalize", scoring="sigmoid",
                        selection_bias=True, n_group=4, topk_group=2, group_score="top2_sum",
                        routed_scaling_factor=2.5),
}
STEPS = 32


@dataclass(frozen=True)
class Exported:
    src: Path
    out: Path
    cfg: MoEConfig  # as mixport reads src


def family_config(family: str) -> MoEConfig:
    return replace(tiny_config(**CONFIGS[family]), model_type=family)


def with_router_changes(src: Path, cfg: MoEConfig, seed: int) -> None:
    """Random non-zero correction biases (transformers initialises them to 0) and, for sigmoid scoring,
    routers scaled down so that no two experts' sigmoids round to the same 1.0 (an honest tie)."""
    path = src / "model.safetensors"
    state = load_file(path)
    gen = torch.Generator().manual_seed(seed)
    adapter = registry.for_config(cfg)
    for i in adapter.moe_layers(cfg):
        name = adapter.hub_name(adapter.router_weight(i))
        if cfg.selection_bias:
            state[name] = state[name] * 0.15
            state[name.replace(".weight", ".e_score_correction_bias")] = 0.1 * torch.randn(
                cfg.num_local_experts, generator=gen)
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="session")
def deepseek_export(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Exported]:
    made: dict[str, Exported] = {}

    def get(family: str) -> Exported:
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            cfg = family_config(family)
            src = write_tiny(root / "src", cfg, seed=3)
            with_router_changes(src, cfg, seed=5)
            result = invoke("export", src, "-o", root / "out", "--no-check")
            assert result.exit_code == 0, result.output
            made[family] = Exported(src, root / "out", load_config(src)[0])
        return made[family]

    return get


def hf_model(folder: Path, family: str):  # -> transformers' *ForCausalLM, fp32, eval
    return registry.get(family).transformers_class().from_pretrained(folder, dtype=torch.float32).eval()


def mixport_nodes(proto: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if (n.domain, n.op_type) == (ops.DOMAIN, op)]


FAMILIES = list(CONFIGS)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_reads_the_family_and_fuses_one_moe_node_per_moe_layer(deepseek_export: Callable[[str], Exported],
                                                                      family: str) -> None:
    ex = deepseek_export(family)
    asked = CONFIGS[family]
    assert {k: getattr(ex.cfg, k) for k in asked} == asked  # the folder really exercises each feature
    proto = onnx.load(str(ex.out / artifact.MODEL_FILE))
    moe_layers = registry.for_config(ex.cfg).moe_layers(ex.cfg)
    routers, moes = mixport_nodes(proto, ops.TOPK_ROUTING), mixport_nodes(proto, ops.MOE)
    assert moe_layers == [1, 2] and len(routers) == len(moes) == 2
    assert {(f.domain, f.name) for f in proto.functions} >= {(ops.DOMAIN, ops.TOPK_ROUTING), (ops.DOMAIN, ops.MOE)}
    spec = ex.cfg.routing()
    for node in routers:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert ops.RoutingSpec.from_attributes(attrs, has_bias=len(node.input) > 1) == spec
        assert attrs["plugin_version"] == ops.ROUTING_PLUGIN_VERSION.encode()
    assert not [t.name for t in proto.graph.initializer if ".experts." in t.name and t.name.endswith(".weight")]
    manifest = artifact.Manifest.read(ex.out)
    kv = {"key": ["batch", 1, "past_seq", ex.cfg.kv_lora_rank], "value": ["batch", 1, "past_seq", ex.cfg.head_dim]}
    assert manifest.cache == {f"past_key_values.{i}.{n}": kv[n] for i in range(3) for n in ("key", "value")}
    assert manifest.cache_shapes() == [(1, ex.cfg.kv_lora_rank), (1, ex.cfg.head_dim)] * 3


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_onnxruntime_matches_transformers(deepseek_export: Callable[[str], Exported], family: str) -> None:
    """model.onnx in a bare InferenceSession vs transformers' own model: prefill + 32 greedy steps,
    batch 2 with left padding, the same tokens, logits within 1e-4."""
    ex = deepseek_export(family)
    ids, mask = parity.left_padded_prompt(ex.cfg.vocab_size)
    ours = parity.greedy(parity.OrtStepper(parity.plain_session(ex.out / artifact.MODEL_FILE)), ids, mask, STEPS)
    theirs = parity.greedy(parity.HfStepper(hf_model(ex.src, family)), ids, mask, STEPS)
    np.testing.assert_array_equal(ours.tokens, theirs.tokens)
    assert ours.tokens.shape == (2, STEPS + 1) and len(set(ours.tokens[0].tolist())) > 4  # not stuck on one token
    assert parity.max_logit_error(ours, theirs, mask) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_the_trace_never_saw(deepseek_export: Callable[[str], Exported], family: str) -> None:
    from mixport.exporter.loader import load_reference

    ex = deepseek_export(family)
    ref, _, _ = load_reference(ex.src)
    parity.assert_unseen_routing(ex.out / artifact.MODEL_FILE, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixport_check_passes(deepseek_export: Callable[[str], Exported], family: str, tmp_path: Path) -> None:
    """`mixport check`: transformers vs ONNX Runtime, the cache tensors (transformers' own), the experts
    each MoE layer selected."""
    ex = deepseek_export(family)
    folder = shutil.copytree(ex.out, tmp_path / "out")
    result = invoke("check", folder, "--steps", 4)
    assert result.exit_code == 0, result.output
    assert "parity: PASSED" in result.output and "present.2.value" in result.output
    routing = [ln.split() for ln in result.output.splitlines() if ln.strip().startswith("layer ")]
    assert len(routing) == 2 and all(r[-1] == "ok" for r in routing), result.output


def test_mixport_run_generates_on_the_portable_graph_saying_why(deepseek_export: Callable[[str], Exported],
                                                                tmp_path: Path) -> None:
    """The fast graph (GroupQueryAttention) has no MLA: `mixport run` runs model.onnx and says why; its
    tokens are transformers' greedy tokens (the runtime allocates the cache from the manifest)."""
    ex = deepseek_export("deepseek_v3")
    folder = shutil.copytree(ex.out, tmp_path / "out")
    result = invoke("run", folder, "--prompt", "The ship sailed", "--max-new-tokens", 6, "--no-stream")
    assert result.exit_code == 0, result.output
    assert "portable graph, not the fast graph: MLA attention" in result.output
    assert not (folder / "model.ort.onnx").exists()
    from mixport.runtime import load

    pipe = load(folder)
    prompt = pipe.encode("The ship sailed")
    ours = pipe.generate_ids([prompt], 6)[0]
    hf = hf_model(ex.src, "deepseek_v3")
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    assert ours == want[:len(ours)] and len(ours) >= 1
    assert json.loads((folder / artifact.MANIFEST).read_text())["cache"]


@pytest.mark.slow
def test_mixport_build_makes_plugin_layers_with_the_routing_fields(deepseek_export: Callable[[str], Exported],
                                                                  trt_module: object, tmp_path: Path) -> None:
    """`mixport build` (TensorRT-RTX on the CPU): MLA builds as plain layers (its k and v of other widths,
    the profile's cache shapes from the graph), each TopKRouting / MoE node a plugin layer, the routing
    plugins carrying V3's sigmoid, groups and scaling (the correction bias is their second input)."""
    from mixport.engine.network import parse_onnx
    from mixport.engine.prepare import prepare_for_parser
    from mixport.engine.trt_logger import make_logger

    ex = deepseek_export("deepseek_v3")
    folder = shutil.copytree(ex.out, tmp_path / "out")
    result = invoke("build", folder)
    assert result.exit_code == 0, result.output
    engine = artifact.Manifest.read(folder).engine
    assert engine is not None and engine.use_plugins
    assert sorted(layer["plugin"] for layer in engine.plugin_layers) == [f"mixport::{ops.MOE}"] * 2 + [
        f"mixport::{ops.TOPK_ROUTING}"] * 2
    trt = trt_module
    logger = make_logger(trt)
    (tmp_path / "parse").mkdir()
    source, _ = prepare_for_parser(folder / artifact.MODEL_FILE, tmp_path / "parse")
    network = parse_onnx(trt, trt.Builder(logger), logger, source, use_plugins=True).network
    routing = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.PLUGIN_V3:
            layer.__class__ = trt.IPluginV3Layer
            core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
            if core.plugin_name == ops.TOPK_ROUTING:
                routing.append((core.values, layer.num_inputs))
    spec = ex.cfg.routing()
    assert len(routing) == 2
    for values, inputs in routing:
        assert inputs == 2  # logits + the selection bias
        assert (values["scoring_func"], values["n_group"], values["topk_group"], values["group_score"]) == \
            (spec.scoring, spec.n_group, spec.topk_group, spec.group_score)
        assert values["routed_scaling_factor"] == pytest.approx(spec.scaling)


def test_the_cache_record_is_read_and_checked(deepseek_export: Callable[[str], Exported], tmp_path: Path) -> None:
    """A manifest without ``cache`` (written before the record) reads its cache dims from the config; a
    record that disagrees with model.onnx is refused by name when the folder is opened."""
    from mixport.errors import RuntimeFailure
    from mixport.runtime import load

    ex = deepseek_export("deepseek_v2")
    folder = shutil.copytree(ex.out, tmp_path / "out")
    path = folder / artifact.MANIFEST
    data = json.loads(path.read_text())
    recorded = artifact.Manifest.read(folder).cache_shapes()
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "cache"}))
    old = artifact.Manifest.read(folder)
    assert old.cache == {} and old.cache_shapes() == recorded
    with load(folder) as pipe:
        assert len(pipe.generate_ids([[5, 6, 7]], 3)[0]) == 3
    data["cache"]["past_key_values.1.key"] = ["batch", 1, "past_seq", ex.cfg.kv_lora_rank + 1]
    path.write_text(json.dumps(data))
    with pytest.raises(RuntimeFailure, match="disagrees with model.onnx on cache"):
        load(folder)


@pytest.mark.slow
def test_int4_export_is_exact_to_its_dequantized_weights(deepseek_export: Callable[[str], Exported],
                                                         tmp_path: Path) -> None:
    """`mixport export --quantize int4` of V3: MLA's projections and the experts quantized, kv_b_proj kept
    float (its weight is split per head in the latent-space attention); the export's own quantization check
    passes, its model.onnx within 1e-3 of the reference on the same dequantized weights."""
    ex = deepseek_export("deepseek_v3")
    result = invoke("export", ex.src, "-o", tmp_path / "q4", "--quantize", "int4")
    assert result.exit_code == 0, result.output
    assert "quantization error: PASSED" in result.output
    row = next(ln for ln in result.output.splitlines() if "err vs dequantized ref" in ln)
    assert row.split()[-1] == "ok", row
    names = {t.name for t in onnx.load(str(tmp_path / "q4" / artifact.MODEL_FILE), load_external_data=False)
             .graph.initializer}
    assert "layers.1.self_attn.q_b_proj.weight_quantized" in names and "layers.1.self_attn.kv_b_proj.weight" in names


def test_runtimes_allocate_the_cache_from_the_record(deepseek_export: Callable[[str], Exported]) -> None:
    """ONNX Runtime's portable session and the TensorRT binding plan (its CPU half) size each cache tensor
    from the manifest: MLA's key [B, 1, P, kv_lora_rank], value [B, 1, P, qk_rope_head_dim]."""
    from mixport.runtime.ort_session import OrtSession
    from mixport.runtime.trt_session import BindingPlan

    ex = deepseek_export("deepseek_v2")
    manifest = artifact.Manifest.read(ex.out)
    session = OrtSession(ex.out / artifact.MODEL_FILE, manifest)
    session.reset(3)
    assert [p.shape for p in session.past] == [(3, 1, 0, 24), (3, 1, 0, 8)] * 3
    shapes = BindingPlan.from_manifest(manifest).input_shapes(batch=2, seq=1, past=5)
    assert shapes["past_key_values.0.key"] == (2, 1, 5, 24) and shapes["past_key_values.2.value"] == (2, 1, 5, 8)
