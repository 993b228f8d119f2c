"""Granite-MoE (GraniteMoeForCausalLM) and GraniteMoeShared (GraniteMoeSharedForCausalLM).

Experts are stacked on disk: ``block_sparse_moe.input_linear`` [E, 2F, H] (gate rows, then up)
and ``block_sparse_moe.output_linear`` [E, H, F]; the router is
``block_sparse_moe.router.layer`` (transformers 5 in memory: ``router.weight``). Routing: top-k
of the logits, then a softmax over those k (TopKRouting order ``topk_softmax``). muP scalars:
``embedding_multiplier`` scales the embeddings, ``attention_multiplier`` is the softmax scale
(replacing 1/sqrt(head_dim)), ``residual_multiplier`` scales each block's output before its
residual add, logits are divided by ``logits_scaling``. GraniteMoeShared adds an ungated SwiGLU
shared MLP beside the experts (``shared_mlp.input_linear`` [2S, H] gate|up,
``shared_mlp.output_linear`` [H, S]; ``shared_intermediate_size`` 0: none), which mixport keeps
in the MoE block as its shared expert.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from mixport.models.adapter import Adapter, Renamed, Shape, refuse_window
from mixport.models.config import MoEConfig

_BLOCK = r"^layers\.(\d+)\.block_sparse_moe\."


class GraniteMoe(Adapter):
    model_type = "granitemoe"
    architectures = ("GraniteMoeForCausalLM",)
    hf_class = "GraniteMoeForCausalLM"

    hf_fields = {"qkv_bias": "attention_bias", "o_bias": "attention_bias", "attention_scale": "attention_multiplier",
                 "embedding_multiplier": "embedding_multiplier", "residual_multiplier": "residual_multiplier",
                 "logits_scaling": "logits_scaling", "normalization": None,
                 "sliding_window": None}  # GraniteMoeConfig has none (refuse_window)
    defaults = {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "attention_scale": 1.0,
                "normalization": "none", "routing_order": "topk_softmax"}

    renames = ((r"\.block_sparse_moe\.router\.(layer\.)?weight$", ".block_sparse_moe.gate.weight"),)
    stacked_experts = ((_BLOCK + r"input_linear\.weight$", "gate_up"), (_BLOCK + r"output_linear\.weight$", "down"),
                       (_BLOCK + r"experts\.gate_up_proj$", "gate_up"), (_BLOCK + r"experts\.down_proj$", "down"))

    fast_graph = True

    def derived(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        refuse_window(raw, self.name)
        return super().derived(raw)

    def to_hf_dict(self, cfg: MoEConfig) -> dict[str, Any]:
        return {**super().to_hf_dict(cfg), "hidden_act": "silu"}


class GraniteMoeShared(GraniteMoe):
    model_type = "granitemoeshared"
    architectures = ("GraniteMoeSharedForCausalLM",)
    hf_class = "GraniteMoeSharedForCausalLM"

    hf_fields = {**GraniteMoe.hf_fields, "shared_expert_intermediate_size": "shared_intermediate_size"}
    shared_path = "shared_mlp"
    mlp_projections = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

    def checkpoint_names(self, hf_name: str, shape: Shape) -> Iterator[Renamed]:
        """``layers.{i}.shared_mlp.input_linear`` [2S, H] -> the shared expert's gate and up rows;
        ``output_linear`` -> its down (kept in the MoE block, as mixport's shared expert)."""
        name = hf_name.removeprefix(self.hub_prefix)
        parts = name.split(".")
        if len(parts) == 5 and parts[0] == "layers" and parts[2] == "shared_mlp" and parts[4] == "weight":
            layer = int(parts[1]) if parts[1].isdigit() else -1
            if parts[3] == "input_linear" and len(shape) == 2 and layer >= 0:
                s = shape[0] // 2
                yield self.shared_weight(layer, "gate"), (s, shape[1]), (slice(0, s),)
                yield self.shared_weight(layer, "up"), (s, shape[1]), (slice(s, 2 * s),)
                return
            if parts[3] == "output_linear" and layer >= 0:
                yield self.shared_weight(layer, "down"), tuple(shape), ()
                return
        yield from super().checkpoint_names(hf_name, shape)
