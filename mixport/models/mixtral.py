"""Mixtral (MixtralForCausalLM): the first family, and the shape of the shared components.

Hub checkpoints name the experts ``block_sparse_moe.experts.{e}.w1/w3/w2`` (gate, up,
down) and the router ``block_sparse_moe.gate``, exactly the reference model's names;
transformers 5 stacks the experts in memory (``mlp.experts.gate_up_proj`` [E, 2F, H],
``mlp.experts.down_proj`` [E, H, F], router ``mlp.gate``) and folders saved from it hold
that layout. Routing: softmax -> top-k -> renormalize.
"""

from __future__ import annotations

from typing import Any

from mixport.models.adapter import Adapter
from mixport.models.config import MoEConfig

_V5_EXPERTS = r"^layers\.(\d+)\.mlp\.experts\."


class Mixtral(Adapter):
    model_type = "mixtral"
    architectures = ("MixtralForCausalLM",)
    hf_class = "MixtralForCausalLM"

    hf_fields = {"normalization": None}  # Mixtral always renormalizes its top-k weights
    defaults = {"normalization": "renormalize", "rope_theta": 1e6,
                "max_position_embeddings": 4096 * 32}  # MixtralConfig's, for a config.json without the key
    kv_heads_default = 8  # MixtralConfig's num_key_value_heads

    renames = ((r"\.mlp\.gate\.", ".block_sparse_moe.gate."),)  # transformers 5's router name
    stacked_experts = ((_V5_EXPERTS + r"gate_up_proj$", "gate_up"), (_V5_EXPERTS + r"down_proj$", "down"))

    fast_graph = True

    def to_hf_dict(self, cfg: MoEConfig) -> dict[str, Any]:
        return {**super().to_hf_dict(cfg), "hidden_act": "silu"}
