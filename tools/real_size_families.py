"""GPT-OSS-20B and DeepSeek-V2-Lite layers for tools/bench_real_size.py (``--family``), as the hub stores them.

config.json is the released one (GPT-OSS-20B: hidden 2880, 32 experts top-4, intermediate 2880, 64 / 8
heads x 64, vocab 201088, sliding / full alternating, YaRN, MXFP4 ``quantization_config``; DeepSeek-V2-Lite:
hidden 2048, 64 routed experts top-6 + 2 shared, moe_intermediate 1408, layer 0 dense with intermediate
10944, MLA kv_lora_rank 512, no q_lora, qk 128 + 64, v 128, 16 heads, vocab 102400, YaRN) with N layers.
The tensors are those of transformers' own model built from that config on the meta device, named as the
hub names them: GPT-OSS's stacked experts as MXFP4 ``*_blocks`` uint8 [E, R, G, 16] (random FP4 codes) and
``*_scales`` uint8 [E, R, G] (one exponent per tensor: rms 1 / sqrt(fan_in)), the rest bf16; DeepSeek's
experts one tensor per expert (``mlp.experts.{e}.gate_proj.weight``), as the hub's files hold them.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

GPT_OSS: dict[str, Any] = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "initializer_range": 0.02, "intermediate_size": 2880, "max_position_embeddings": 131072, "model_type": "gpt_oss",
    "num_attention_heads": 64, "num_experts_per_tok": 4, "num_key_value_heads": 8, "num_local_experts": 32,
    "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                            "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                            "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "use_cache": True, "vocab_size": 201088}
DEEPSEEK_V2_LITE: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"], "aux_loss_alpha": 0.001, "bos_token_id": 100000,
    "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_key_value_heads": 16,
    "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "v_head_dim": 128, "vocab_size": 102400}
FAMILIES = {"gpt_oss": GPT_OSS, "deepseek_v2": DEEPSEEK_V2_LITE}
TINY = {  # --tiny: the same structure in seconds (ids of the small tokenizer)
    "gpt_oss": {"hidden_size": 64, "intermediate_size": 64, "head_dim": 16, "num_attention_heads": 4,
                "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "experts_per_token": 2,
                "vocab_size": 512, "max_position_embeddings": 512, "sliding_window": 4, "eos_token_id": 2,
                "pad_token_id": 0},
    "deepseek_v2": {"hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "kv_lora_rank": 32,
                    "n_routed_experts": 8, "num_experts_per_tok": 3, "num_attention_heads": 4,
                    "num_key_value_heads": 4, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
                    "vocab_size": 512, "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2}}
FP4_RMS = math.sqrt(sum(v * v for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6)) / 8)  # uniform e2m1 codes


def hf_config(family: str, layers: int, tiny: bool = False) -> dict[str, Any]:
    """The config.json: the released one at LAYERS layers (GPT-OSS: sliding first, then alternating)."""
    raw = copy.deepcopy({**FAMILIES[family], **(TINY[family] if tiny else {}), "num_hidden_layers": layers,
                         "torch_dtype": "bfloat16"})
    if family == "gpt_oss":
        raw["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return raw


def dims(family: str, tiny: bool = False) -> dict[str, Any]:
    """The dimensions the report's header and a --checkpoint check use."""
    keys = ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "num_local_experts", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
            "kv_lora_rank", "vocab_size")
    raw = hf_config(family, 1, tiny)
    return {k: raw[k] for k in keys if k in raw}


def hub_tensors(raw: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(hub name, shape, safetensors dtype) of every tensor, from transformers' model on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.for_model(**copy.deepcopy({k: v for k, v in raw.items() if k != "quantization_config"}))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    out: list[tuple[str, tuple[int, ...], str]] = []
    for name, t in model.state_dict().items():
        shape = tuple(t.shape)
        stacked = re.search(r"\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
        if stacked and raw["model_type"] == "gpt_oss":  # [E, in, out] = [E, G * 32, R] -> blocks, scales
            e, fan_in, rows = shape
            groups = fan_in // 32
            out += [(name + "_blocks", (e, rows, groups, 16), "U8"), (name + "_scales", (e, rows, groups), "U8")]
        elif stacked:  # transformers' [E, 2F, H] / [E, H, F] -> the hub's per-expert Linear weights [out, in]
            base = name.rsplit(".", 1)[0]
            e, rows, cols = shape
            roles = (("gate", rows // 2, cols), ("up", rows // 2, cols)) if stacked.group(1) == "gate_up_proj" \
                else (("down", rows, cols),)
            out += [(f"{base}.{i}.{role}_proj.weight", (r, c), "BF16") for i in range(e) for role, r, c in roles]
        else:
            out.append((name, shape, "BF16"))
    return out


def plan(raw: dict[str, Any]) -> tuple[list[list[tuple[str, str, tuple[int, ...], str]]], set[str]]:
    """(shards: [[(law name, hub name, shape, dtype)]], one per layer then the rest; router names)."""
    groups: dict[int, list[tuple[str, str, tuple[int, ...], str]]] = {}
    routers: set[str] = set()
    for name, shape, dtype in hub_tensors(raw):
        m = re.search(r"layers\.(\d+)\.", name)
        groups.setdefault(int(m.group(1)) if m else raw["num_hidden_layers"], []).append((name, name, shape, dtype))
        if name.endswith((".mlp.gate.weight", ".mlp.router.weight")):
            routers.add(name)
    return [groups[k] for k in sorted(groups)], routers


def scale_exponent(shape: tuple[int, ...]) -> int:
    """The biased exponent that gives MXFP4 weights of fan-in G * 32 an rms of 1 / sqrt(fan_in)."""
    return 127 + round(math.log2((shape[-1] * 32) ** -0.5 / FP4_RMS))
