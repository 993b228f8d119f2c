"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen2-MoE's layout without the shared expert, with per-head
q/k RMSNorm.

``q_norm`` / ``k_norm`` are RMSNorms over ``head_dim`` applied to each head before RoPE;
``head_dim`` is set explicitly (not hidden / heads); ``attention_bias`` (false in released
configs) puts a bias on q/k/v and o. Routing: softmax -> top-k, renormalized when
``norm_topk_prob`` (true in released configs). Sliding windows, when ``use_sliding_window``,
apply to every layer. Names and the dense-layer rule are Qwen2-MoE's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mixport.config_fields import Field
from mixport.models.adapter import read
from mixport.models.config import MoEConfig
from mixport.models.qwen2_moe import Qwen2Moe, qwen_hf_fields

_FLAG = Field("bool")


class Qwen3Moe(Qwen2Moe):
    model_type = "qwen3_moe"
    architectures = ("Qwen3MoeForCausalLM",)
    hf_class = "Qwen3MoeForCausalLM"

    hf_fields = {"intermediate_size": "moe_intermediate_size", "num_local_experts": "num_experts",
                 "dense_intermediate_size": "intermediate_size", "qkv_bias": "attention_bias",
                 "o_bias": "attention_bias", "normalization": None, "sliding_window": None}
    defaults = {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "qkv_bias": False,
                "o_bias": False, "dense_intermediate_size": 6144, "qk_norm": "head",
                "bos_token_id": None, "eos_token_id": None}
    kv_heads_default = 4  # Qwen3MoeConfig's num_key_value_heads

    def window(self, raw: Mapping[str, Any], layers: int) -> dict[str, Any]:
        """The sliding window, on every layer, when ``use_sliding_window`` (no layer_types)."""
        use = read(raw, "use_sliding_window", _FLAG, False)
        window = read(raw, "sliding_window", Field("int", high=2**24, nullable=True), 4096) if use else None
        return {"sliding_window": window, "sliding_layers": None}

    def to_hf_dict(self, cfg: MoEConfig) -> dict[str, Any]:
        window = cfg.sliding_window is not None
        return {**super(Qwen2Moe, self).to_hf_dict(cfg), **qwen_hf_fields(cfg), "use_sliding_window": window,
                "sliding_window": cfg.sliding_window}
