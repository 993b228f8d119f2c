"""OLMoE (OlmoeForCausalLM): routed experts, q/k RMSNorm over the whole projection width.

``q_norm`` (width heads * head_dim) and ``k_norm`` (kv_heads * head_dim) normalize the q and k
projections before they are split into heads; ``clip_qkv``, when set, clamps q, k and v to
[-clip, clip] after the norms; ``attention_bias`` puts a bias on q/k/v and o. Routing:
softmax -> top-k, renormalized only when ``norm_topk_prob`` (false by default). Names are
Qwen-MoE's (``mlp.gate``, ``mlp.experts.{e}.gate_proj`` ...); head_dim is hidden / heads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mixport.errors import ConfigError
from mixport.models.adapter import Adapter, refuse_window
from mixport.models.config import MoEConfig
from mixport.models.qwen2_moe import norm_topk
from mixport.typed_json import shown

_V5_EXPERTS = r"^layers\.(\d+)\.mlp\.experts\."


class Olmoe(Adapter):
    model_type = "olmoe"
    architectures = ("OlmoeForCausalLM",)
    hf_class = "OlmoeForCausalLM"

    hf_fields = {"num_local_experts": "num_experts", "qkv_bias": "attention_bias", "o_bias": "attention_bias",
                 "clip_qkv": "clip_qkv", "normalization": None,
                 "sliding_window": None}  # OlmoeConfig has none (refuse_window)
    aliases = {"num_local_experts": ("num_local_experts",)}
    defaults = {"rope_theta": 1e4, "rms_norm_eps": 1e-5, "qk_norm": "projection", "bos_token_id": None,
                "eos_token_id": 50279, "pad_token_id": 1}

    router_path = "mlp.gate"
    experts_path = "mlp.experts"
    expert_projections = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    derives = ("normalization",)
    stacked_experts = ((_V5_EXPERTS + r"gate_up_proj$", "gate_up"), (_V5_EXPERTS + r"down_proj$", "down"))

    fast_graph = True

    def derived(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        refuse_window(raw, self.name)
        out = {**super().derived(raw), "normalization": norm_topk(raw, False)}
        if raw.get("head_dim") not in (None, raw["hidden_size"] // raw["num_attention_heads"]):
            raise ConfigError("config.json field 'head_dim' differs from hidden_size / num_attention_heads",
                              given=shown(raw["head_dim"]),
                              expected=f"{raw['hidden_size'] // raw['num_attention_heads']} (OLMoE's q/k norms "
                                       "are sized from hidden_size)")
        return out

    def to_hf_dict(self, cfg: MoEConfig) -> dict[str, Any]:
        return {**super().to_hf_dict(cfg), "hidden_act": "silu",
                "norm_topk_prob": cfg.normalization == "renormalize"}
