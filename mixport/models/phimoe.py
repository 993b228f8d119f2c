"""PhiMoE (PhimoeForCausalLM, Phi-3.5-MoE): sparsemixer routing, LayerNorm, biases, its own LongRoPE.

Hub checkpoints use Mixtral's names (``block_sparse_moe.gate``, ``block_sparse_moe.experts.{e}.w1 / w3
/ w2``); transformers 5 holds them as ``mlp.router`` and stacked ``mlp.experts.gate_up_proj`` [E, 2F, H]
/ ``down_proj`` [E, H, F] in memory, and folders saved that way are read too. What differs from Mixtral
(transformers' modeling_phimoe):

* routing: ``sparsemixer`` (TopKRouting scoring "sparsemixer", top-2 only, eps = ``router_jitter_noise``,
  no renormalization; the inference path: the training path's Gumbel sampling and jitter are not exported);
* every norm is ``nn.LayerNorm`` with weight and bias (eps ``rms_norm_eps``): MoEConfig ``norm_type`` "layer";
* ``attention_bias`` puts a bias on q, k, v and o; ``lm_head_bias`` on lm_head;
* ``rope_scaling`` longrope (Phi-3.5-MoE's released config) is PhiMoE's own variant: the short factors
  always, cos / sin x ``short_mscale`` or ``long_mscale`` (past ``original_max_position_embeddings``);
  see ``phimoe_model``. Other rope scalings are refused (transformers' class reads short/long_mscale).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mixport.errors import ConfigError
from mixport.models import rope
from mixport.models.adapter import Adapter
from mixport.models.config import MoEConfig

_V5_EXPERTS = r"^layers\.(\d+)\.mlp\.experts\."


class Phimoe(Adapter):
    model_type = "phimoe"
    architectures = ("PhimoeForCausalLM",)
    hf_class = "PhimoeForCausalLM"

    hf_fields = {"normalization": None, "qkv_bias": "attention_bias", "o_bias": "attention_bias",
                 "lm_head_bias": "lm_head_bias", "sparsemixer_eps": "router_jitter_noise"}
    defaults = {"normalization": "none", "scoring": "sparsemixer", "sparsemixer_eps": 0.01, "norm_type": "layer",
                "rope_theta": 1e6, "max_position_embeddings": 4096 * 32}  # PhimoeConfig's
    kv_heads_default = 8  # PhimoeConfig's num_key_value_heads
    rope_types = ("default", "longrope")

    renames = ((r"\.mlp\.router\.", ".block_sparse_moe.gate."),)  # transformers 5's in-memory names
    stacked_experts = ((_V5_EXPERTS + r"gate_up_proj$", "gate_up"), (_V5_EXPERTS + r"down_proj$", "down"))

    def derived(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        out = super().derived(raw)
        if out["rope_type"] == "longrope":
            for key in ("short_mscale", "long_mscale"):
                if out.get(f"rope_{key}") is None:
                    where, _ = rope.section(raw)
                    raise ConfigError(f"config.json field '{where}.{key}' is missing", given="missing",
                                      expected="a number (PhiMoE scales cos/sin by it under longrope)")
        return out

    def reference_model(self, cfg: MoEConfig):  # -> phimoe_model.PhimoeDecoderModel
        from mixport.models.phimoe_model import PhimoeDecoderModel

        return PhimoeDecoderModel(cfg, self.decoder_layer)

    def to_hf_dict(self, cfg: MoEConfig) -> dict[str, Any]:
        return {**super().to_hf_dict(cfg), "hidden_act": "silu", "input_jitter_noise": 0.0}
