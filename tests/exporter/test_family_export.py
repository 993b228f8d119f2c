"""Every Mixtral-family architecture through `mixport export` (issue 11's "done when", export side).

Per family: one tiny Hugging Face folder written by transformers' own classes
(``write_tiny``), exported once per session through the CLI; its config exercises what the
family adds (Qwen2-MoE: gated shared expert, a dense mlp_only layer, q/k/v bias; Qwen3-MoE:
head_dim != hidden/heads, per-head q/k norm, 12 experts, top-4, norm_topk_prob; OLMoE: clip_qkv,
q/k norm over the projection; Granite: muP scalars far from 1, top-k then softmax;
GraniteMoeShared: its shared MLP; GPT-OSS: attention sinks, q/k/v/o bias, sliding window 5 on layers 0
and 2 (shorter than the 11-token prompt), a biased router, biased experts with the clamped SwiGLU
stored interleaved, all biases and sinks random non-zero). The written model.onnx runs in a plain
``onnxruntime.InferenceSession`` against transformers' model (prefill + 32 greedy steps, batch
2, left padding), equals the same trace before the fusion passes, computes routing the trace
never saw, and passes `mixport check`. Layouts big checkpoints come in ride on those exports:
OLMoE's and Granite's folders are transformers' shards + index, Qwen2-MoE is exported past the
(lowered) 2 GB limit into model.onnx.data. fp16 and bf16 are each covered once, on a
one-MoE-layer variant of one family (not the cross product: each export costs seconds of
torch.export).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file

from mixport import artifact, ops
from mixport.exporter.config import load_config
from mixport.exporter.tiny import write_tiny
from mixport.models import MoEConfig, registry
from mixport.runtime import ort_graph
from tests.conftest import tiny_config
from tests.exporter import parity
from tests.helpers import invoke, require_module

require_module("transformers")  # the families' tiny folders are written by transformers' classes

BASE = dict(hidden_size=72, num_attention_heads=4, num_key_value_heads=2, head_dim=18, intermediate_size=40)
GPT_OSS_YARN = dict(rope_type="yarn", rope_factor=32.0, rope_beta_fast=32.0, rope_beta_slow=1.0, rope_original_max=4096,
                    rope_truncate=False)  # the released GPT-OSS configs' rope_scaling
MUP = dict(embedding_multiplier=12.0, attention_scale=0.0625, residual_multiplier=0.22, logits_scaling=6.0)


@dataclass(frozen=True)
class Family:
    changes: dict  # to the tiny config (BASE applied first)
    order: str  # the TopKRouting node's routing order ...
    normalization: str  # ... and normalization, as the family's config implies them
    ops: dict[str, int] | None = None  # op_type -> count per layer the family's graph must hold
    sharded: bool = False  # the folder holds transformers' shards + index, not one model.safetensors
    external_data: bool = False  # exported past the 2 GB limit (lowered): weights in model.onnx.data
    activation: str = "swiglu"  # the MoE node's activation (GPT-OSS: swiglu_clamped, plugin_version "3")


FAMILIES = {
    "qwen2_moe": Family(dict(num_hidden_layers=3, dense_layers=(1,), dense_intermediate_size=88, qkv_bias=True,
                             shared_expert_intermediate_size=56, shared_expert_gate=True, normalization="none"),
                        "softmax_topk", "none", external_data=True),
    "qwen3_moe": Family(dict(head_dim=24, qk_norm="head", num_local_experts=12, num_experts_per_tok=4,
                             normalization="renormalize"), "softmax_topk", "renormalize"),
    "olmoe": Family(dict(qk_norm="projection", clip_qkv=0.6, num_local_experts=10, num_experts_per_tok=3,
                         normalization="none"), "softmax_topk", "none", ops={"Clip": 3}, sharded=True),
    "granitemoe": Family(dict(**MUP, num_experts_per_tok=1), "topk_softmax", "none", sharded=True),
    "granitemoeshared": Family(dict(**MUP, num_local_experts=6, shared_expert_intermediate_size=56),
                               "topk_softmax", "none"),
    "gpt_oss": Family(dict(num_hidden_layers=3, sliding_window=5, sliding_layers=(0, 2), qkv_bias=True, o_bias=True,
                           num_local_experts=6, swiglu_limit=1.5, normalization="none", **GPT_OSS_YARN),
                      "topk_softmax", "none", ops={"Clip": 0, "Sigmoid": 0}, activation="swiglu_clamped"),
}
STEPS = 32  # greedy decode steps after the prefill (the bar)


def family_config(family: str, **more: object) -> MoEConfig:
    return replace(tiny_config(**{**BASE, **FAMILIES[family].changes, **more}), model_type=family)


def small_config(family: str) -> MoEConfig:
    """The cheap variant: the family's config with one MoE layer (Qwen2-MoE: and its dense layer)
    of k + 2 experts (at least 4)."""
    cfg = family_config(family)
    return replace(cfg, num_hidden_layers=1 + len(cfg.dense_layers),
                   num_local_experts=max(4, cfg.num_experts_per_tok + 2))


@dataclass(frozen=True)
class Exported:
    src: Path  # the Hugging Face folder
    out: Path  # what `mixport export SRC -o OUT` wrote (read-only)
    unfused: Path  # model.onnx of the same trace before the fusion passes (what --no-fuse writes)
    cfg: MoEConfig  # as mixport reads SRC


@contextlib.contextmanager
def keeping_unfused(dst: Path) -> Iterator[None]:
    """While an export runs: the traced graph handed to the fusion passes is also saved as
    DST/model.onnx (beside a copy of its weights file), then the real passes run on it."""
    from mixport import passes

    real = passes.run_passes

    def run_passes(proto: onnx.ModelProto, target: str = "portable", weights_dir: Path | None = None,
                   work_dir: Path | None = None, detail: Callable[[str], None] | None = None,
                   quantize: passes.QuantOptions | None = None) -> passes.PipelineReport:
        assert weights_dir is not None  # the export streams the traced weights to a work file
        dst.mkdir(parents=True)
        shutil.copy(Path(weights_dir) / artifact.TRACED_DATA, dst)
        onnx.save_model(proto, str(dst / artifact.MODEL_FILE))  # locations stay relative: TRACED_DATA
        return real(proto, target, weights_dir=weights_dir, work_dir=work_dir, detail=detail, quantize=quantize)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(passes, "run_passes", run_passes)
        yield


def cli_export(src: Path, out: Path, *args: str) -> Path:
    result = invoke("export", src, "-o", out, "--no-check", *args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def family_export(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Exported]:
    """family_export(model_type) -> its tiny folder exported by `mixport export`, once per session."""
    made: dict[str, Exported] = {}

    def get(family: str) -> Exported:
        if family not in made:
            root, fam = tmp_path_factory.mktemp(family), FAMILIES[family]
            src = write_tiny(root / ("single" if fam.sharded else "src"), family_config(family), seed=3)
            if fam.sharded:
                src = hf_sharded(src, root / "src", family)
            with keeping_unfused(root / "unfused"), pytest.MonkeyPatch.context() as mp:
                if fam.external_data:
                    mp.setattr(artifact, "TWO_GB", 1 << 16)
                out = cli_export(src, root / "out")
            made[family] = Exported(src, out, root / "unfused", load_config(src)[0])
        return made[family]

    return get


def hf_model(folder: Path, family: str):  # -> the family's transformers *ForCausalLM, fp32, eval
    cls = registry.get(family).transformers_class()
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def hf_sharded(src: Path, dst: Path, family: str) -> Path:
    """SRC re-saved by transformers in several model-0000x-of-0000y.safetensors shards + the index."""
    hf_model(src, family).save_pretrained(dst, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / name, dst / name)
    return dst


def mixport_nodes(proto: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if (n.domain, n.op_type) == (ops.DOMAIN, op)]


def attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def linears(proto: onnx.ModelProto) -> int:
    return sum(n.op_type in ("MatMul", "Gemm") for n in proto.graph.node)


def expected_linears(cfg: MoEConfig) -> int:
    """MatMul/Gemm nodes a fused graph keeps: per layer q/k/v/o + the two attention products, per MoE
    layer its router (+ the shared expert's three, + its gate), per dense layer its three, lm_head."""
    moe = len(registry.for_config(cfg).moe_layers(cfg))
    shared = 3 + cfg.shared_expert_gate if cfg.shared_expert_intermediate_size else 0
    return 6 * cfg.num_hidden_layers + moe * (1 + shared) + 3 * len(cfg.dense_layers) + 1


def assert_fused_graph(proto: onnx.ModelProto, cfg: MoEConfig, order: str, normalization: str,
                       activation: str = "swiglu") -> None:
    """One MoE and one TopKRouting node per MoE layer with the family's routing, their function
    bodies attached, no per-expert MatMul left."""
    moe_layers = len(registry.for_config(cfg).moe_layers(cfg))
    routers, moes = mixport_nodes(proto, ops.TOPK_ROUTING), mixport_nodes(proto, ops.MOE)
    assert len(routers) == len(moes) == moe_layers
    assert {(f.domain, f.name) for f in proto.functions} >= {(ops.DOMAIN, ops.TOPK_ROUTING), (ops.DOMAIN, ops.MOE)}
    k, e = cfg.num_experts_per_tok, cfg.num_local_experts
    for node in routers:
        assert attributes(node) == {"k": k, "num_experts": e, "normalization": normalization.encode(),
                                    "order": order.encode(), "scoring_func": b"softmax", "n_group": 1,
                                    "topk_group": 1, "group_score": b"max", "routed_scaling_factor": 1.0,
                                    "sparsemixer_eps": 0.0, "plugin_namespace": b"mixport",
                                    "plugin_version": ops.ROUTING_PLUGIN_VERSION.encode()}
    for node in moes:
        assert {n: attributes(node)[n] for n in ("num_experts", "k", "activation")} == \
            {"num_experts": e, "k": k, "activation": activation.encode()}
        extended = activation != "swiglu" or cfg.expert_bias
        version = ops.BIAS_PLUGIN_VERSION if extended else ops.PLUGIN_VERSION
        assert attributes(node)["plugin_version"] == version.encode()
        assert len(node.input) == len(ops.MOE_INPUTS) + (len(ops.BIAS_INPUTS) if extended else 0)
    assert linears(proto) == expected_linears(cfg)
    assert not [t.name for t in proto.graph.initializer if ".experts." in t.name and t.name.endswith(".weight")]


# ---- one session export per family ---------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_export_fuses_one_moe_node_per_moe_layer(family_export: Callable[[str], Exported], family: str) -> None:
    ex, fam = family_export(family), FAMILIES[family]
    asked = {**BASE, **fam.changes}  # the features the tiny folder must really exercise, read back by mixport
    assert ex.cfg.model_type == family and {k: getattr(ex.cfg, k) for k in asked} == asked
    assert (ex.cfg.routing_order, ex.cfg.normalization) == (fam.order, fam.normalization)
    fused = onnx.load(str(ex.out / artifact.MODEL_FILE))
    assert_fused_graph(fused, ex.cfg, fam.order, fam.normalization, fam.activation)
    unfused = onnx.load(str(ex.unfused / artifact.MODEL_FILE), load_external_data=False)
    moe_layers = len(registry.for_config(ex.cfg).moe_layers(ex.cfg))
    assert linears(unfused) - linears(fused) == 3 * ex.cfg.num_local_experts * moe_layers  # every expert's
    assert not mixport_nodes(unfused, ops.MOE) and len(mixport_nodes(unfused, ops.TOPK_ROUTING)) == moe_layers
    for op, per_layer in (fam.ops or {}).items():
        assert sum(n.op_type == op for n in fused.graph.node) == per_layer * ex.cfg.num_hidden_layers, op
    manifest = artifact.Manifest.read(ex.out)
    assert manifest.fused and manifest.config["model_type"] == family


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_onnxruntime_matches_transformers(family_export: Callable[[str], Exported], family: str) -> None:
    """model.onnx in a bare InferenceSession vs transformers' own model: prefill + 32 greedy steps,
    batch 2 with left padding, the same tokens, logits within 1e-4."""
    ex = family_export(family)
    ids, mask = parity.left_padded_prompt(ex.cfg.vocab_size)
    ours = parity.greedy(parity.OrtStepper(parity.plain_session(ex.out / artifact.MODEL_FILE)), ids, mask, STEPS)
    theirs = parity.greedy(parity.HfStepper(hf_model(ex.src, family)), ids, mask, STEPS)
    np.testing.assert_array_equal(ours.tokens, theirs.tokens)
    assert ours.tokens.shape == (2, STEPS + 1)
    assert parity.max_logit_error(ours, theirs, mask) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_equals_unfused(family_export: Callable[[str], Exported], family: str) -> None:
    ex = family_export(family)
    ids, mask = parity.left_padded_prompt(ex.cfg.vocab_size, seed=5)
    runs = [parity.greedy(parity.OrtStepper(parity.plain_session(folder / artifact.MODEL_FILE)), ids, mask, 4)
            for folder in (ex.unfused, ex.out)]
    np.testing.assert_array_equal(runs[0].tokens, runs[1].tokens)
    for a, b in zip(runs[0].logits, runs[1].logits, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_the_trace_never_saw(family_export: Callable[[str], Exported], family: str) -> None:
    from mixport.exporter.loader import load_reference

    ex = family_export(family)
    ref, _, _ = load_reference(ex.src)
    parity.assert_unseen_routing(ex.out / artifact.MODEL_FILE, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixport_check_passes(family_export: Callable[[str], Exported], family: str, tmp_path: Path) -> None:
    """`mixport check` (transformers vs ONNX Runtime, the experts each MoE layer picked) on a copy."""
    ex = family_export(family)
    folder = shutil.copytree(ex.out, tmp_path / "out")  # the check may add the fast graph's files
    result = invoke("check", folder, "--steps", 4)
    assert result.exit_code == 0, result.output
    assert "parity: PASSED" in result.output and "pytorch-transformers vs onnxruntime" in result.output
    moe_layers = len(registry.for_config(ex.cfg).moe_layers(ex.cfg))
    routing = [ln.split() for ln in result.output.splitlines() if ln.strip().startswith("layer ")]
    assert len(routing) == moe_layers and all(r[-1] == "ok" for r in routing), result.output  # one per MoE layer


# ---- dtypes, checkpoint and output layouts: one family each ----------------------------------------

@pytest.mark.parametrize("family", [f for f, fam in FAMILIES.items() if fam.sharded])
def test_sharded_checkpoint(family_export: Callable[[str], Exported], family: str) -> None:
    """The session folder is transformers' shards + index (Granite: its stacked experts in one shard,
    its router in another); the tests above ran on its export (transformers reading the same folder)."""
    ex = family_export(family)
    weight_map = json.loads((ex.src / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 2 and shards[0].startswith("model-00001-of-") and not (ex.src / "model.safetensors").exists()
    assert all((ex.src / shard).is_file() for shard in shards)
    assert artifact.Manifest.read(ex.out).source.path == str(ex.src.absolute())


@pytest.mark.parametrize("family", [f for f, fam in FAMILIES.items() if fam.external_data])
def test_external_data(family_export: Callable[[str], Exported], family: str) -> None:
    """Past the 2 GB limit (lowered for the session export) the weights went to model.onnx.data;
    the tests above ran on that layout."""
    out = family_export(family).out
    manifest = artifact.Manifest.read(out)
    assert artifact.DATA_FILE in manifest.files and manifest.data_sha256
    assert (out / artifact.MODEL_FILE).stat().st_size < (out / artifact.DATA_FILE).stat().st_size
    proto = onnx.load(str(out / artifact.MODEL_FILE), load_external_data=False)
    stored = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert stored == {artifact.DATA_FILE}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no work files left


def test_fp16_export(tmp_path: Path) -> None:
    """fp16: fused the same way, fp16 weights, and ONNX Runtime within fp16 tolerance of transformers
    (teacher-forced on transformers' greedy tokens: fp16 may flip a near-tie)."""
    family = "granitemoeshared"
    src = write_tiny(tmp_path / "src", small_config(family), seed=4)
    out = cli_export(src, tmp_path / "out", "--dtype", "fp16")
    proto = onnx.load(str(out / artifact.MODEL_FILE))
    cfg = load_config(src)[0]
    assert_fused_graph(proto, cfg, FAMILIES[family].order, FAMILIES[family].normalization)
    floats = {t.data_type for t in proto.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT,
                                                                              onnx.TensorProto.FLOAT16)}
    assert onnx.TensorProto.FLOAT16 in floats
    ids, mask = parity.left_padded_prompt(cfg.vocab_size, seed=2)
    theirs = parity.greedy(parity.HfStepper(hf_model(src, family)), ids, mask, 4)
    ours = parity.greedy(parity.OrtStepper(parity.plain_session(out / artifact.MODEL_FILE)), ids, mask, 4,
                         forced=theirs.tokens)
    for a, b in zip(ours.logits[1:], theirs.logits[1:], strict=True):
        np.testing.assert_allclose(a, b, atol=5e-2, rtol=5e-2)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours.logits[0][valid], theirs.logits[0][valid], atol=5e-2, rtol=5e-2)


def test_gpt_oss_fp16_export(tmp_path: Path) -> None:
    """GPT-OSS in fp16: the exporter writes the clamps as Min / Max of Cast constants (fp32: Clip); fused
    the same way (version-3 MoE nodes, no clamp left outside them) and within fp16 tolerance of
    transformers, teacher-forced."""
    family = "gpt_oss"
    cfg = replace(family_config(family), num_hidden_layers=2, sliding_layers=(0,), num_local_experts=4,
                  head_dim=16)  # GroupQueryAttention's rotary needs a multiple of 16: the fast graph builds it
    src = write_tiny(tmp_path / "src", cfg, seed=4)
    out = cli_export(src, tmp_path / "out", "--dtype", "fp16")
    proto = onnx.load(str(out / artifact.MODEL_FILE))
    cfg = load_config(src)[0]
    assert_fused_graph(proto, cfg, FAMILIES[family].order, FAMILIES[family].normalization, "swiglu_clamped")
    assert not [n.op_type for n in proto.graph.node if n.op_type in ("Min", "Max", "Clip", "Sigmoid")]
    ids, mask = parity.left_padded_prompt(cfg.vocab_size, seed=2)
    theirs = parity.greedy(parity.HfStepper(hf_model(src, family)), ids, mask, 4)
    ours = parity.greedy(parity.OrtStepper(parity.plain_session(out / artifact.MODEL_FILE)), ids, mask, 4,
                         forced=theirs.tokens)
    for a, b in zip(ours.logits[1:], theirs.logits[1:], strict=True):
        np.testing.assert_allclose(a, b, atol=5e-2, rtol=5e-2)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours.logits[0][valid], theirs.logits[0][valid], atol=5e-2, rtol=5e-2)
    # the fast graph finds every weight by name (the fp16 sinks are upcast in the graph, not folded away)
    assert ort_graph.supported(artifact.Manifest.read(out).config, "fp16") is None
    ort_graph.build(ort_graph.export_weights(out / artifact.MODEL_FILE, artifact.Manifest.read(out).config),
                    artifact.Manifest.read(out).config, "fp16")


def test_bf16_export(tmp_path: Path) -> None:
    """bf16 (ONNX Runtime's CPU provider has no bf16 kernels): fused the same way, and each MoE
    node's stacked experts are exactly transformers' expert weights rounded to bf16."""
    family = "qwen3_moe"
    src = write_tiny(tmp_path / "src", small_config(family), seed=4)
    out = cli_export(src, tmp_path / "out", "--dtype", "bf16")
    proto = onnx.load(str(out / artifact.MODEL_FILE))
    cfg = load_config(src)[0]
    assert_fused_graph(proto, cfg, FAMILIES[family].order, FAMILIES[family].normalization)
    onnx.checker.check_model(proto)
    inits = {t.name: t for t in proto.graph.initializer}
    moe = mixport_nodes(proto, ops.MOE)[0]
    gate_up, down = (onnx.numpy_helper.to_array(inits[name]) for name in moe.input[3:5])
    assert inits[moe.input[3]].data_type == onnx.TensorProto.BFLOAT16
    hub = load_file(src / "model.safetensors")  # as transformers wrote it: the hub's names
    f = cfg.intermediate_size
    for e in range(cfg.num_local_experts):
        w = {p: _bf16_in_out(hub[f"model.layers.0.mlp.experts.{e}.{p}_proj.weight"]) for p in ("gate", "up", "down")}
        np.testing.assert_array_equal(gate_up[e, :, :f].astype(np.float32), w["gate"])
        np.testing.assert_array_equal(gate_up[e, :, f:].astype(np.float32), w["up"])
        np.testing.assert_array_equal(down[e].astype(np.float32), w["down"])


def _bf16_in_out(weight: torch.Tensor) -> np.ndarray:
    """A Linear's weight [out, in] rounded to bf16, as fp32 [in, out] (the MoE op's layout)."""
    return weight.to(torch.bfloat16).float().T.numpy()


# ---- GPT-OSS: what its export adds (version-3 MoE nodes) ----------------------------------------------

def test_gpt_oss_builds_with_version_3_moe_plugins(family_export: Callable[[str], Exported], tmp_path: Path) -> None:
    """`mixport build` (TensorRT-RTX, CPU): every TopKRouting and biased / clamped MoE node is a plugin layer,
    the MoE ones of plugin version 3 with the node's alpha and limit."""
    require_module("tensorrt_rtx_bindings")
    ex = family_export("gpt_oss")
    folder = shutil.copytree(ex.out, tmp_path / "out")
    result = invoke("build", folder)
    assert result.exit_code == 0, result.output
    layers = artifact.Manifest.read(folder).engine.plugin_layers
    moe_layers = len(registry.for_config(ex.cfg).moe_layers(ex.cfg))
    assert sorted(layer["plugin"] for layer in layers) == ["mixport::MoE"] * moe_layers + \
        ["mixport::TopKRouting"] * moe_layers
    moes = mixport_nodes(onnx.load(str(folder / artifact.MODEL_FILE), load_external_data=False), ops.MOE)
    for node in moes:
        assert (attributes(node)["alpha"], attributes(node)["limit"]) == \
            pytest.approx((ex.cfg.swiglu_alpha, ex.cfg.swiglu_limit))


def test_gpt_oss_fusion_refuses_experts_whose_clamps_disagree(family_export: Callable[[str], Exported],
                                                               tmp_path: Path) -> None:
    """The clamped SwiGLU is matched exactly: one expert whose up clamp differs from its gate clamp
    leaves that layer unfused, with the reason (and the export's required pass would fail)."""
    from mixport.onnx_io import WeightFiles
    from mixport.passes import fuse_moe_experts
    from mixport.passes import graph_utils as gu

    ex = family_export("gpt_oss")
    proto = onnx.load(str(ex.unfused / artifact.MODEL_FILE), load_external_data=False)
    gu.tensorize_constants(proto)
    graph = gu.import_graph(proto, WeightFiles(ex.unfused))  # read in place; nothing is written
    clips = [n for n in graph.nodes if n.op == "Clip" and n.inputs[1].name]  # up's: both bounds
    low = clips[0].inputs[1]  # -limit of the first layer's first expert, as the exporter wrote it
    clips[0].inputs[1] = gs_constant(low.name + "_changed", -2.0 * ex.cfg.swiglu_limit)
    reasons: list[str] = []
    fused = fuse_moe_experts.apply(graph, reasons, WeightFiles(ex.unfused, tmp_path / "fused.data"))
    moe_layers = len(registry.for_config(ex.cfg).moe_layers(ex.cfg))
    assert fused == moe_layers - 1
    assert any("clamped SwiGLU" in r for r in reasons), reasons


def gs_constant(name: str, value: float):  # -> onnx_graphsurgeon.Constant
    import onnx_graphsurgeon as gs

    return gs.Constant(name, np.array(value, dtype=np.float32))
