"""The fast ONNX Runtime graph builds every registered family and equals the portable model.onnx.

One tiny export per family (session-scoped, unfused, written by transformers' own class) carries
the family's features at odd sizes: q/k/v and o biases, q/k RMSNorm per head and over the
projection, clipping, an explicit head_dim, the softmax scale, YaRN rope (Qwen3-MoE), sliding windows shorter than the
prompts (on some layers or all), dense MLP layers, gated and ungated shared experts, both routing
orders with and without renormalization, muP scalars, tied embeddings, top-k 1..4, GPT-OSS's attention
sinks (GroupQueryAttention's head_sink), biased router and experts, clamped SwiGLU. Mixtral's export
(tests/runtime/conftest.py) runs through the same parity test.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from mixport import artifact
from mixport.errors import RuntimeFailure
from mixport.exporter.export import export
from mixport.exporter.tiny import TINY, write_tiny
from mixport.models import registry
from mixport.runtime import load, ort_graph
from mixport.runtime.generate import left_pad
from mixport.runtime.ort_fast import OrtFastSession
from mixport.runtime.ort_session import OrtSession
from tests.helpers import invoke, require_module

FAMILIES = {  # model_type -> changes to the tiny config (each family's features)
    "qwen2_moe": dict(hidden_size=80, num_attention_heads=5, num_key_value_heads=1, num_hidden_layers=3,
                      num_local_experts=10, num_experts_per_tok=4, intermediate_size=48, qkv_bias=True,
                      shared_expert_intermediate_size=64, shared_expert_gate=True, dense_layers=(1,),
                      dense_intermediate_size=112, normalization="none", sliding_window=4, sliding_layers=(0, 2)),
    "qwen3_moe": dict(hidden_size=72, head_dim=32, num_hidden_layers=3, num_local_experts=12, num_experts_per_tok=3,
                      intermediate_size=40, qk_norm="head", sliding_window=5, dense_layers=(0,),
                      dense_intermediate_size=80, rope_type="yarn", rope_factor=4.0, rope_original_max=64,
                      rope_truncate=False),
    "olmoe": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=6, num_local_experts=9,
                  qk_norm="projection", clip_qkv=1.5, qkv_bias=True, o_bias=True, normalization="none"),
    "granitemoe": dict(qkv_bias=True, o_bias=True, attention_scale=0.15, embedding_multiplier=12.0,
                       residual_multiplier=0.22, logits_scaling=8.0, routing_order="topk_softmax",
                       normalization="none", tie_word_embeddings=True, num_experts_per_tok=3),
    "granitemoeshared": dict(num_experts_per_tok=1, shared_expert_intermediate_size=48, attention_scale=0.2,
                             embedding_multiplier=6.0, residual_multiplier=0.5, logits_scaling=4.0,
                             routing_order="topk_softmax", normalization="none"),
    "gpt_oss": dict(num_hidden_layers=3, sliding_window=4, sliding_layers=(0, 2), qkv_bias=True, o_bias=True,
                    num_local_experts=6, swiglu_limit=1.5, routing_order="topk_softmax", normalization="none",
                    attention_sinks=True, router_bias=True, expert_bias=True, expert_activation="swiglu_clamped",
                    rope_type="yarn", rope_factor=32.0, rope_original_max=4096, rope_beta_fast=32.0,
                    rope_beta_slow=1.0, rope_truncate=False),
}
# A feature the graph builds without weights of its own, set back to its neutral value: the graph
# still builds, and its logits must move away from model.onnx's (each feature is exercised).
NEUTRAL = {
    "qwen2_moe": {"sliding_window": None, "normalization": "renormalize"},
    "qwen3_moe": {"sliding_window": None, "normalization": "none", "rope_attention_factor": 1.0},
    "olmoe": {"clip_qkv": None, "normalization": "renormalize"},
    "granitemoe": {"attention_scale": None, "embedding_multiplier": 1.0, "residual_multiplier": 1.0,
                   "logits_scaling": 1.0, "routing_order": "softmax_topk"},
    "granitemoeshared": {"residual_multiplier": 1.0, "routing_order": "softmax_topk"},
    "gpt_oss": {"sliding_window": None, "expert_activation": "swiglu", "swiglu_limit": 7.0},
}
# A feature with weights of its own, turned off: its weights would go unused (or others missing).
WEIGHTED = {
    "qwen2_moe": {"qkv_bias": False, "shared_expert_intermediate_size": 0, "shared_expert_gate": False,
                  "dense_layers": ()},
    "qwen3_moe": {"qk_norm": "none", "dense_layers": ()},
    "olmoe": {"qk_norm": "none", "o_bias": False},
    "granitemoe": {"qkv_bias": False},
    "granitemoeshared": {"shared_expert_intermediate_size": 0},
    "gpt_oss": {"attention_sinks": False, "router_bias": False, "expert_bias": False},
}
PROMPTS = ([5, 17, 42, 7, 99, 3, 250, 11, 64, 8], [300, 2, 77, 19, 140, 6])  # longer than the windows
DECODE_STEPS = 6


@pytest.fixture(scope="session")
def exports(rt_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """(model_type, fuse=False) -> a tiny export of the family, made once per session (Mixtral's
    unfused one: the runtime tests' own export)."""
    sources: dict[str, Path] = {}
    made = {("mixtral", False): rt_export}

    def get(model_type: str, fuse: bool = False) -> Path:
        if (model_type, fuse) in made:
            return made[model_type, fuse]
        if model_type not in sources:
            require_module("transformers")
            for name in ("torch.onnx", "torch.export", "onnxscript"):
                logging.getLogger(name).setLevel(logging.ERROR)
            cfg = replace(TINY, model_type=model_type, **FAMILIES[model_type])
            sources[model_type] = write_tiny(tmp_path_factory.mktemp(f"{model_type}-src"), cfg, seed=1)
        out = tmp_path_factory.mktemp(f"{model_type}-{'fused' if fuse else 'out'}") / "export"
        export(sources[model_type], out, fuse=fuse)
        made[model_type, fuse] = out
        return out

    return get


@pytest.fixture(params=["mixtral", *FAMILIES])
def family(request: pytest.FixtureRequest, exports: Callable[..., Path]) -> Path:
    return exports(request.param)


def _config(folder: Path) -> dict:
    return artifact.Manifest.read(folder).config


def _prefill_and_decode(session: object, steps: int, tokens: list[np.ndarray] | None = None
                        ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Logits of the real prompt positions, then of ``steps`` decode steps (batch 2, left-padded),
    feeding ``tokens`` (default: each step's argmax) -> (logits per step, tokens fed)."""
    ids, mask, pos = left_pad(list(PROMPTS), 0)
    session.reset(len(PROMPTS))
    logits = session.step(ids, mask, pos)  # [B, S, V]
    out, fed, last = [logits[mask.astype(bool)]], [], logits[:, -1]
    for i in range(steps):
        fed.append(tokens[i] if tokens else last.argmax(-1).astype(np.int64))
        mask = np.concatenate([mask, np.ones((len(PROMPTS), 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        last = session.step(fed[-1][:, None], mask, pos)[:, -1]
        out.append(last)
    return out, fed


def test_fast_graph_equals_portable_over_prefill_and_decode(family: Path) -> None:
    model_type = _config(family)["model_type"]
    for field, value in FAMILIES.get(model_type, {}).items():  # the export carries the features
        got = _config(family)[field]
        assert (tuple(got) if isinstance(got, list) else got) == value, field
    assert ort_graph.supported(_config(family), "fp32") is None
    portable = load(family, threads=1, graph="portable")
    fast = load(family, threads=1, graph="fast")
    assert isinstance(fast.session, OrtFastSession) and isinstance(portable.session, OrtSession)
    want, tokens = _prefill_and_decode(portable.session, DECODE_STEPS)
    got, _ = _prefill_and_decode(fast.session, DECODE_STEPS, tokens)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert np.abs(g - w).max() <= 1e-4, (model_type, step, float(np.abs(g - w).max()))
    assert len({int(t) for t in np.concatenate(tokens)}) > 1  # the decode steps did not stall on one token


@pytest.mark.parametrize("model_type", ["qwen2_moe", "granitemoeshared", "gpt_oss"])
def test_fused_and_unfused_exports_build_the_same_fast_graph(exports: Callable[..., Path], model_type: str) -> None:
    """The fused export's stacked experts (one mixport::MoE per sparse layer; shared experts and
    dense layers stay MatMuls) are read back as the same weights: identical logits."""
    fused = exports(model_type, fuse=True)
    proto = onnx.load(str(fused / artifact.MODEL_FILE), load_external_data=False)
    sparse = len(registry.get(model_type).moe_layers(ort_graph.model_cfg(_config(fused))))
    assert sum(n.op_type == "MoE" for n in proto.graph.node) == sparse
    logits = [_prefill_and_decode(load(folder, threads=1, graph="fast").session, 3)[0]
              for folder in (exports(model_type), fused)]
    for a, b in zip(*logits, strict=True):
        np.testing.assert_array_equal(a, b)


def _fast_prefill(folder: Path, cfg: dict, path: Path, dtype: str = "fp32") -> np.ndarray:
    weights = ort_graph.export_weights(folder / artifact.MODEL_FILE, cfg)
    onnx.save_model(ort_graph.build(weights, cfg, dtype), str(path))
    session = OrtFastSession(path, replace(artifact.Manifest.read(folder), dtype=dtype), threads=1)
    return _prefill_and_decode(session, 0)[0][0].astype(np.float32)


def test_fast_graph_in_fp16_agrees_with_fp32(family: Path, tmp_path: Path) -> None:
    """Every layer's constants (clip bounds, muP scalars, biases, norms) in the graph's float type."""
    cfg = _config(family)
    half, full = (_fast_prefill(family, cfg, tmp_path / f"{d}.onnx", d) for d in ("fp16", "fp32"))
    np.testing.assert_allclose(half, full, atol=5e-2, rtol=5e-2)
    assert (half.argmax(-1) == full.argmax(-1)).mean() > 0.9


def _cases(table: dict[str, dict]) -> list:
    return [pytest.param(m, f, id=f"{m}-{f}") for m, fields in table.items() for f in fields]


@pytest.mark.parametrize(("model_type", "field"), _cases(NEUTRAL))
def test_each_feature_is_built(exports: Callable[..., Path], model_type: str, field: str, tmp_path: Path) -> None:
    """Back at its neutral value, a feature's absence shows in the logits (so the parity test above
    holds because the graph builds it, not because it does not matter)."""
    family = exports(model_type)
    cfg = _config(family)
    portable = load(family, threads=1, graph="portable")
    want = _prefill_and_decode(portable.session, 0)[0][0]
    assert np.abs(_fast_prefill(family, cfg, tmp_path / "same.onnx") - want).max() <= 1e-4
    changed = _fast_prefill(family, {**cfg, field: NEUTRAL[model_type][field]}, tmp_path / "neutral.onnx")
    assert np.abs(changed - want).max() > 1e-3, field


@pytest.mark.parametrize(("model_type", "field"), _cases(WEIGHTED))
def test_a_feature_with_weights_is_never_dropped(exports: Callable[..., Path], model_type: str, field: str) -> None:
    family = exports(model_type)
    cfg = _config(family)
    weights = ort_graph.export_weights(family / artifact.MODEL_FILE, cfg)
    with pytest.raises(RuntimeFailure, match="unused|missing"):
        ort_graph.build(weights, {**cfg, field: WEIGHTED[model_type][field]}, "fp32")


def test_mixport_run_uses_the_fast_graph(family: Path) -> None:
    res = invoke("run", family, "--prompt", "The ship sailed", "--max-new-tokens", 4, "--threads", 1)
    assert res.exit_code == 0, res.output
    assert "backend: onnxruntime (cpu, fast graph)" in res.output and "unavailable" not in res.output, res.output
    assert artifact.Manifest.read(family).ort_graph is not None


# Families the fast graph does not build, and the words of the reason `mixport run` prints for them.
PORTABLE = {"phimoe": "PhimoeForCausalLM (the fast graph does not build this family's modules)",  # LayerNorm,
            # DeepSeek: MLA (an export's config says so first: tests/exporter/test_deepseek_export.py)
            **{m: f"{n} (the fast graph does not build this family's modules)" for m, n in
               (("deepseek_v2", "DeepseekV2ForCausalLM"), ("deepseek_v3", "DeepseekV3ForCausalLM"))}}
# its LongRoPE mscale switch (one choice per call: a prefill crossing original_max_position_embeddings scales
# every position alike, GroupQueryAttention's cache one per position) and the lm_head bias


def test_every_family_builds_the_fast_graph() -> None:
    fast = sorted(a.model_type for a in registry.ADAPTERS if a.model_type != "mixtral" and a.fast_graph)
    assert sorted(FAMILIES) == fast
    assert sorted(a.model_type for a in registry.ADAPTERS if not a.fast_graph) == sorted(PORTABLE)
    for model_type, why in PORTABLE.items():
        cfg = {"model_type": model_type, "head_dim": 64}
        assert ort_graph.supported(cfg, "fp32") == why
