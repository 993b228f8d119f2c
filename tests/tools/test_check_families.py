"""`mixport check` and `mixport bench` on the Mixtral family beyond Mixtral (the tiny Mixtral export is
the other tests'): every other registered family written by transformers' own class and exported
once per session — a Qwen3-MoE with a dense layer, a GraniteMoeShared (top-k of the logits, then
softmax; a shared MLP; muP scalars), a Qwen2-MoE (gated shared expert, q/k/v bias, a dense first
layer), an OLMoE (q/k norm over the projection, clip, top-1), a Granite-MoE, a PhiMoE (sparsemixer,
LayerNorm, biases; the portable graph, with the reason) and a GPT-OSS (sinks, a sliding window, biased
router and experts, clamped SwiGLU).

Routing agreement is reported for the layers with a router only, labelled by decoder layer; the
PyTorch side is transformers' class or mixport's reference (hooked at the adapter's router
path); a check against another family's model or source fails loudly. `mixport bench` times
each family and says which graph ran, and why not the fast one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mixport.exporter.tiny import TINY
from mixport.models import registry
from tests.helpers import invoke, one_line_error

# Qwen3-MoE: head_dim != hidden / heads, per-head q/k norms, top-3 of 6, renormalized; layer 1 dense.
QWEN3 = replace(TINY, model_type="qwen3_moe", hidden_size=72, head_dim=24, intermediate_size=40,
                num_hidden_layers=3, num_local_experts=6, num_experts_per_tok=3, qk_norm="head",
                normalization="renormalize", dense_layers=(1,), dense_intermediate_size=56,
                bos_token_id=None, eos_token_id=None)
# GraniteMoeShared: the tiny Mixtral's I/O signature (2 layers, 2 kv heads, head_dim 16, vocab 512), so
# that the tiny Mixtral export can be checked against it (another family: must fail).
GRANITE = replace(TINY, model_type="granitemoeshared", intermediate_size=40, num_local_experts=5,
                  routing_order="topk_softmax", normalization="none", shared_expert_intermediate_size=48,
                  attention_scale=0.1, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=1.5)
QWEN2 = replace(TINY, model_type="qwen2_moe", hidden_size=72, head_dim=18, intermediate_size=40, num_hidden_layers=3,
                num_local_experts=9, num_experts_per_tok=4, qkv_bias=True, shared_expert_intermediate_size=48,
                shared_expert_gate=True, dense_layers=(0,), dense_intermediate_size=56, normalization="none",
                bos_token_id=None, eos_token_id=None)
OLMOE = replace(TINY, model_type="olmoe", qk_norm="projection", clip_qkv=2.0, num_local_experts=6,
                num_experts_per_tok=1, normalization="none", bos_token_id=None, eos_token_id=7, pad_token_id=1)
GRANITE_PLAIN = replace(TINY, model_type="granitemoe", num_local_experts=4, routing_order="topk_softmax",
                        normalization="none", attention_scale=0.2, logits_scaling=2.0)
# PhiMoE: sparsemixer routing (eps 0.05), LayerNorm with bias, q/k/v/o and lm_head biases; portable graph.
PHIMOE = replace(TINY, model_type="phimoe", num_local_experts=5, num_experts_per_tok=2, scoring="sparsemixer",
                 sparsemixer_eps=0.05, normalization="none", norm_type="layer", qkv_bias=True, o_bias=True,
                 lm_head_bias=True)
# GPT-OSS: attention sinks, a window of 4 on layer 0 (shorter than the prompt), biased router and experts,
# the clamped SwiGLU at a limit the tiny model's values cross
GPT_OSS = replace(TINY, model_type="gpt_oss", num_local_experts=4, qkv_bias=True, o_bias=True, sliding_window=4,
                  sliding_layers=(0,), routing_order="topk_softmax", normalization="none", attention_sinks=True,
                  router_bias=True, expert_bias=True, expert_activation="swiglu_clamped", swiglu_limit=1.5,
                  bos_token_id=None, eos_token_id=None)
CONFIGS = {"qwen3_moe": QWEN3, "granitemoeshared": GRANITE, "qwen2_moe": QWEN2, "olmoe": OLMOE,
           "granitemoe": GRANITE_PLAIN, "phimoe": PHIMOE, "gpt_oss": GPT_OSS}


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """model_type -> its tiny export (written and exported on first use, once per session)."""
    from mixport.exporter.export import export
    from mixport.exporter.tiny import write_tiny

    done: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in done:
            base = tmp_path_factory.mktemp(model_type)
            export(write_tiny(base / "src", CONFIGS[model_type], seed=5), base / "out")
            done[model_type] = base / "out"
        return done[model_type]

    return get


@pytest.fixture
def qwen3_export(exports: Callable[[str], Path]) -> Path:
    return exports("qwen3_moe")


@pytest.fixture
def granite_export(exports: Callable[[str], Path]) -> Path:
    return exports("granitemoeshared")


@pytest.fixture
def family_export(request: pytest.FixtureRequest, exports: Callable[[str], Path]) -> Path:
    return exports(request.param)


CHECKED_ELSEWHERE = ("deepseek_v2", "deepseek_v3")  # tests/exporter/test_deepseek_export.py runs `mixport check` on
#                                                     its session exports (no second export of each here)


def test_every_family_is_checked_here() -> None:
    """A newly registered family gets a config here (Mixtral's export is the shared tiny_export)."""
    assert sorted([*CONFIGS, "mixtral", *CHECKED_ELSEWHERE]) == sorted(a.model_type for a in registry.ADAPTERS)


def _routing_rows(text: str) -> list[str]:
    """The report's per-layer routing lines: 'layer N  tokens  same  ties ... ok|FAIL'."""
    return [ln.split()[1] for ln in text.splitlines() if ln.startswith("  layer ")]


@pytest.mark.parametrize("family_export", list(CONFIGS), indirect=True)
def test_check_cli_passes_with_transformers(family_export: Path) -> None:
    """`mixport check` against transformers' class: PASSED, one routing row per layer with a router."""
    cfg = CONFIGS[json.loads((family_export / "manifest.json").read_text())["config"]["model_type"]]
    moe = registry.for_config(cfg).moe_layers(cfg)
    res = invoke("check", family_export, "--steps", "3")
    assert res.exit_code == 0, res.output
    assert "parity: pytorch-transformers vs onnxruntime" in res.stdout and "parity: PASSED" in res.stdout
    assert _routing_rows(res.stdout) == [str(i) for i in moe]
    dense = [i for i in range(cfg.num_hidden_layers) if i not in moe]
    if dense:
        assert f"(dense MLP, no router: layer {', '.join(map(str, dense))})" in res.stdout
    else:
        assert "dense MLP" not in res.stdout


@pytest.mark.parametrize("family_export", list(CONFIGS), indirect=True)
def test_check_with_mixports_reference(family_export: Path) -> None:
    """The reference's routing hooks sit at the adapter's router path, on the MoE layers only; every
    token routes alike (no tie excuses one here)."""
    from mixport.tools.check import run_check

    report = run_check(family_export, steps=3, prefer_transformers=False)
    cfg = CONFIGS[report_model_type(family_export)]
    assert report.runners[0] == "pytorch-mixport" and report.passed, report.failures()
    assert [r.layer for r in report.routing] == registry.for_config(cfg).moe_layers(cfg)
    assert report.dense_layers == list(cfg.dense_layers)
    assert all(r.tokens == r.agree == 3 + 12 for r in report.routing)  # prompt 12 + 3 steps, one row
    assert report.same_tokens == len(report.ref_tokens) == 4


def report_model_type(folder: Path) -> str:
    return json.loads((folder / "manifest.json").read_text())["config"]["model_type"]


def test_another_familys_model_fails_parity(granite_export: Path, tiny_export: Path) -> None:
    """The tiny Mixtral's model.onnx has the Granite export's inputs and outputs and router count;
    checked against the Granite source it is a parity failure (exit 3) naming logits and routing."""
    res = invoke("check", granite_export, "--onnx", tiny_export / "model.onnx", "--steps", "1",
                 "--reference", "mixport")
    assert res.exit_code == 3, res.output
    assert "parity: FAILED" in res.stdout
    assert "error: parity check failed: logits" in res.output and "routing of layer 0" in res.output


def test_another_familys_source_is_refused(qwen3_export: Path, granite_export: Path, tmp_path: Path) -> None:
    """A folder whose manifest now points at another family's checkpoint: one line, exit 1, before
    anything is compared (not a pass, not a parity table)."""
    folder = tmp_path / "out"
    shutil.copytree(qwen3_export, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["source"]["path"] = json.loads((granite_export / "manifest.json").read_text())["source"]["path"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(invoke("check", folder, "--steps", "1", "--reference", "mixport"),
                   "the source model is another family than the export", "GraniteMoeSharedForCausalLM",
                   "qwen3_moe")


def test_ties_are_judged_on_logits() -> None:
    """Two tiny probabilities (far apart in logits) are no tie; logits within the gap are."""
    from mixport.tools.check import TIE_GAP, routing_ties

    logits = np.array([[10.0, 9.0, -20.0, -21.0],  # k=3: 3rd/4th probs ~1e-13 apart, logits 1 apart
                       [10.0, 9.0, -20.0, -20.0],  # an exact tie
                       [10.0, 9.0, 5.0, 5.0 - 0.5 * TIE_GAP * 5.0],  # within the relative gap
                       [10.0, 9.0, 5.0, 5.0 - 2.0 * TIE_GAP * 5.0]], dtype=np.float32)  # beyond it
    assert routing_ties(logits.astype(np.float64), 3).tolist() == [False, True, True, False]
    assert routing_ties(logits, 4).tolist() == [False] * 4  # k = E: nothing to tie with


@pytest.mark.parametrize("family_export", list(CONFIGS), indirect=True)
def test_bench_every_family(family_export: Path) -> None:
    """`mixport bench` times the family as `mixport run` runs it and names the graph: the fast one where
    ort_graph builds the family, else model.onnx with the reason."""
    from mixport.runtime import ort_graph

    res = invoke("bench", family_export, "--prompt-len", "4", "--new-tokens", "3", "--runs", "1", "--threads", "1",
                 "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    manifest = json.loads((family_export / "manifest.json").read_text())
    why_not = ort_graph.supported(manifest["config"], manifest["dtype"])
    assert (data["backend"], data["graph"]) == ("onnxruntime", "portable" if why_not else "fast")
    assert data["graph_reason"] == (f"portable graph, not the fast graph: {why_not}" if why_not else "")
    (row,) = data["rows"]
    assert row["prefill_ms"] > 0 and row["decode_tok_s"] > 0
    table = invoke("bench", family_export, "--prompt-len", "4", "--new-tokens", "3", "--runs", "1", "--threads", "1",
                   "--graph", "portable")
    assert table.exit_code == 0, table.output
    assert table.stdout.splitlines()[2] == "  portable graph: --graph portable"
