"""PhiMoE (Phi-3.5-MoE, transformers' PhimoeForCausalLM) through `mixport export`: one thorough export.

The tiny folder is written by transformers' own class and exercises everything PhiMoE adds:
sparsemixer routing (top-2, router_jitter_noise 0.05 so the threshold masks some experts and not
others), LayerNorm with non-zero biases, q/k/v/o biases, an lm_head bias, and Phi-3.5-MoE's LongRoPE
with short and long factors and ``original_max_position_embeddings`` 24: the 11-token prompt starts
under it and the 32 greedy steps cross it, so both of transformers' cos/sin scales (short_mscale,
long_mscale) are used. model.onnx in a plain ``onnxruntime.InferenceSession`` matches transformers
over prefill + 32 greedy steps (batch 2, left padding) within 1e-4 with identical tokens, each MoE
layer is one TopKRouting (scoring sparsemixer) + one MoE node, and `mixport check` passes.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from mixport import artifact, ops
from mixport.exporter.config import load_config
from mixport.exporter.tiny import write_tiny
from mixport.models import MoEConfig, registry
from tests.conftest import tiny_config
from tests.exporter import parity
from tests.exporter.test_family_export import STEPS, attributes, cli_export, mixport_nodes
from tests.helpers import invoke, require_module

require_module("transformers")

ORIGINAL = 24  # original_max_position_embeddings: the prompt (11) starts under it, decoding crosses it
HALF = 9  # head_dim 18 / 2: LongRoPE factors per rotated pair


def phimoe_config() -> MoEConfig:
    rng = np.random.default_rng(7)
    return replace(tiny_config(hidden_size=72, num_attention_heads=4, num_key_value_heads=2, head_dim=18,
                               intermediate_size=40, num_hidden_layers=2, num_local_experts=6,
                               num_experts_per_tok=2, max_position_embeddings=96),
                   model_type="phimoe", scoring="sparsemixer", normalization="none", sparsemixer_eps=0.05,
                   norm_type="layer", qkv_bias=True, o_bias=True, lm_head_bias=True, rope_theta=1e4,
                   rope_type="longrope", rope_original_max=ORIGINAL,
                   rope_short_factor=tuple(float(v) for v in 1 + rng.random(HALF)),
                   rope_long_factor=tuple(float(v) for v in 2 + 6 * rng.random(HALF)),
                   rope_short_mscale=1.13, rope_long_mscale=1.37)


@pytest.fixture(scope="module")
def phimoe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, MoEConfig]:
    """(transformers' folder, its `mixport export`, the config mixport read), once per module."""
    root = tmp_path_factory.mktemp("phimoe")
    src = write_tiny(root / "src", phimoe_config(), seed=3)
    return src, cli_export(src, root / "out"), load_config(src)[0]


def hf_model(folder: Path):  # -> transformers' PhimoeForCausalLM, fp32, eval
    return registry.get("phimoe").transformers_class().from_pretrained(folder, dtype=torch.float32).eval()


def test_config_read_back(phimoe) -> None:
    """Every PhiMoE feature the folder asks for is what mixport read from transformers' config.json."""
    _, _, cfg = phimoe
    want = phimoe_config()
    for name in ("scoring", "sparsemixer_eps", "norm_type", "qkv_bias", "o_bias", "lm_head_bias", "rope_type",
                 "rope_original_max", "rope_short_mscale", "rope_long_mscale", "normalization"):
        assert getattr(cfg, name) == getattr(want, name), name
    np.testing.assert_allclose(cfg.rope_long_factor, want.rope_long_factor)


def test_one_routing_and_one_moe_node_per_layer(phimoe) -> None:
    _, out, cfg = phimoe
    proto = onnx.load(str(out / artifact.MODEL_FILE))
    routers, moes = mixport_nodes(proto, ops.TOPK_ROUTING), mixport_nodes(proto, ops.MOE)
    assert len(routers) == len(moes) == cfg.num_hidden_layers
    for node in routers:
        attrs = attributes(node)
        assert (attrs["scoring_func"], attrs["normalization"], attrs["k"]) == (b"sparsemixer", b"none", 2)
        assert attrs["sparsemixer_eps"] == pytest.approx(0.05) and attrs["plugin_version"] == b"3"
    assert {(f.domain, f.name) for f in proto.functions} >= {(ops.DOMAIN, ops.TOPK_ROUTING), (ops.DOMAIN, ops.MOE)}
    assert sum(n.op_type == "LayerNormalization" for n in proto.graph.node) == 2 * cfg.num_hidden_layers + 1
    biases = {t.name for t in proto.graph.initializer if t.name.endswith(".bias")}
    assert "lm_head.bias" in biases and "layers.1.self_attn.o_proj.bias" in biases and "norm.bias" in biases


def test_plain_onnxruntime_matches_transformers(phimoe) -> None:
    """Prefill + 32 greedy steps, batch 2 with left padding: the same tokens, logits within 1e-4; the
    run crosses original_max_position_embeddings (both mscales used), and the threshold masked some
    experts (sparsemixer weights below 1 and above the plain softmax's)."""
    src, out, cfg = phimoe
    ids, mask = parity.left_padded_prompt(cfg.vocab_size)
    assert ids.shape[1] < ORIGINAL < ids.shape[1] + STEPS
    ours = parity.greedy(parity.OrtStepper(parity.plain_session(out / artifact.MODEL_FILE)), ids, mask, STEPS)
    theirs = parity.greedy(parity.HfStepper(hf_model(src)), ids, mask, STEPS)
    np.testing.assert_array_equal(ours.tokens, theirs.tokens)
    assert ours.tokens.shape == (2, STEPS + 1)
    assert parity.max_logit_error(ours, theirs, mask) <= 1e-4


def test_longrope_scales_matter(phimoe) -> None:
    """The parity above can fail: with the long mscale swapped for the short one (or the long factors
    used), transformers' logits past position 24 differ from mixport's reference by far more than 1e-4."""
    from mixport.exporter.loader import load_reference

    src, _, cfg = phimoe
    ref, _, _ = load_reference(src)
    swapped, _, _ = load_reference(src)
    swapped.cfg = replace(cfg, rope_long_mscale=cfg.rope_short_mscale)
    ids = torch.arange(3, 3 + 30)[None]
    mask, pos = torch.ones_like(ids), torch.arange(30)[None]
    with torch.no_grad():
        a = ref(ids, mask, pos, ref.empty_past(1))[0]
        b = swapped(ids, mask, pos, swapped.empty_past(1))[0]
        hf = hf_model(src)(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert (a - hf).abs().max() <= 1e-4 < (b - hf).abs().max()


def test_mixport_check_passes(phimoe, tmp_path: Path) -> None:
    """`mixport check` (transformers vs ONNX Runtime, the experts each MoE layer picked) on a copy; the
    fast ONNX Runtime graph is not built for PhiMoE, and the check says why."""
    _, out, cfg = phimoe
    folder = shutil.copytree(out, tmp_path / "out")
    result = invoke("check", folder, "--steps", 4)
    assert result.exit_code == 0, result.output
    assert "parity: PASSED" in result.output and "pytorch-transformers vs onnxruntime" in result.output
    routing = [ln.split() for ln in result.output.splitlines() if ln.strip().startswith("layer ")]
    assert len(routing) == cfg.num_hidden_layers and all(r[-1] == "ok" for r in routing), result.output


def test_mixport_run_generates_on_the_portable_graph_saying_why(phimoe) -> None:
    """The fast ONNX Runtime graph has no LayerNorm / LongRoPE-mscale / lm_head-bias path: `mixport run`
    generates with model.onnx and says why."""
    _, out, _ = phimoe
    result = invoke("run", out, "--prompt", "The ship sailed", "--max-new-tokens", "6")
    assert result.exit_code == 0, result.output
    assert "fast graph unavailable" in result.output and "PhimoeForCausalLM" in result.output, result.output


def test_mixport_build_makes_sparsemixer_plugin_layers(phimoe, trt_module, tmp_path: Path) -> None:
    """`mixport build` (TensorRT-RTX on the CPU): each TopKRouting becomes a version-3 plugin layer whose
    fields carry the sparsemixer routing, each MoE a MoE plugin layer."""
    _, out, cfg = phimoe
    folder = shutil.copytree(out, tmp_path / "out")
    result = invoke("build", folder)
    assert result.exit_code == 0, result.output
    engine = artifact.Manifest.read(folder).engine
    plugins = sorted(layer["plugin"] for layer in engine.plugin_layers)
    assert plugins == [f"mixport::{ops.MOE}"] * cfg.num_hidden_layers + [f"mixport::{ops.TOPK_ROUTING}"] * 2
    import tempfile

    from mixport.engine.network import parse_onnx
    from mixport.engine.prepare import prepare_for_parser
    from mixport.engine.trt_logger import make_logger

    trt, logger = trt_module, make_logger(trt_module)
    with tempfile.TemporaryDirectory() as tmp:
        source, _ = prepare_for_parser(folder / artifact.MODEL_FILE, Path(tmp))
        network = parse_onnx(trt, trt.Builder(logger), logger, source, use_plugins=True).network
        routing = []
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.PLUGIN_V3:
                layer.__class__ = trt.IPluginV3Layer
                core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
                if core.plugin_name == ops.TOPK_ROUTING:
                    routing.append(core)
    assert len(routing) == cfg.num_hidden_layers
    for plugin in routing:
        assert plugin.plugin_version == "3"
        assert (plugin.values["scoring_func"], plugin.values["normalization"], plugin.values["k"]) == \
            ("sparsemixer", "none", 2)
        assert plugin.values["sparsemixer_eps"] == pytest.approx(0.05)


def test_sparsemixer_threshold_is_exercised(phimoe) -> None:
    """On the parity prompt the threshold both masks every other expert (a first weight of exactly 1)
    and keeps some (a first weight below 1): the export test covers both sides of sparsemixer's mask."""
    from mixport.exporter.loader import load_reference

    src, _, cfg = phimoe
    ref, _, _ = load_reference(src)
    firsts: list[torch.Tensor] = []
    hooks = [layer.block_sparse_moe.gate.register_forward_hook(lambda _m, _a, out: firsts.append(out[0][:, 0]))
             for layer in ref.layers]
    ids, mask = parity.left_padded_prompt(cfg.vocab_size)
    with torch.no_grad():
        ref(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(parity.positions(mask)),
            ref.empty_past(2))
    for h in hooks:
        h.remove()
    first = torch.cat(firsts)
    assert (first == 1.0).any() and (first < 0.99).any(), first
