"""DeepSeek-V3 (DeepseekV3ForCausalLM; R1 and Kimi-K2 share it), as transformers' deepseek_v3 modeling
file computes it: DeepSeek-V2's model (``deepseek_v2``: MLA, dense first layers, routed + ungated shared
experts) with its own routing and RoPE layout.

Routing: sigmoid scores of fp32 logits; selection adds the fp32 ``e_score_correction_bias`` [E]
(``mlp.gate.e_score_correction_bias``) and keeps the ``topk_group`` best of ``n_group`` groups, a group
scored by the sum of its two best biased scores; the weights are the unbiased sigmoids of the k picked,
renormalised when ``norm_topk_prob``, x ``routed_scaling_factor``. ``topk_method`` and ``scoring_func``
keys are not read (transformers' V3 ignores them). RoPE: ``rope_interleave`` (default true) rotates
interleaved pairs and writes the rotated evens, then the rotated odds; false: rotate_half. Multi-token
prediction layers (``layers.{i}`` with i >= num_hidden_layers in the checkpoint) are not read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mixport.config_fields import Field
from mixport.errors import ConfigError
from mixport.models.adapter import read
from mixport.models.config import MoEConfig
from mixport.models.deepseek_v2 import DeepseekV2, check_mla
from mixport.typed_json import shown

_LAYER = re.compile(r"^layers\.(\d+)\.")


class DeepseekV3(DeepseekV2):
    model_type = "deepseek_v3"
    architectures = ("DeepseekV3ForCausalLM",)
    hf_class = "DeepseekV3ForCausalLM"

    hf_fields = {**DeepseekV2.hf_fields, "num_local_experts": "num_local_experts"}  # its attribute_map's key
    aliases = {"num_local_experts": ("n_routed_experts",)}
    defaults = {**DeepseekV2.defaults, "max_position_embeddings": 4096, "bos_token_id": 0, "eos_token_id": 1,
                "dense_intermediate_size": 18432, "intermediate_size": 2048, "num_local_experts": 256}
    derives = (*DeepseekV2.derives, "normalization")
    shared_default = 1
    dense_default = 3

    def check_variant(self, raw: Mapping[str, Any]) -> None:
        quant = raw.get("quantization_config")
        if quant is not None:  # the hub's V3 / R1 hold fp8 blocks with weight_scale_inv tensors
            method = quant.get("quant_method") if isinstance(quant, dict) else quant
            raise ConfigError("config.json has a 'quantization_config': quantized DeepSeek-V3 checkpoints are not "
                              "read", given=f"quant_method {shown(method)}",
                              expected="a bf16/fp16/fp32 checkpoint",
                              hint="dequantize the checkpoint to bf16 first (DeepSeek's fp8_cast_bf16.py)")
        check_mla(raw)

    def derived(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        interleave = read(raw, "rope_interleave", Field("bool", nullable=True), True)
        return {**super().derived(raw), "rope_layout": "pairs_to_half" if interleave else "half"}

    def layout_of(self, layout: str) -> str:
        return "half" if layout == "half" else "pairs_to_half"

    def routing(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The TopKRouting fields of DeepseekV3TopkRouter: sigmoid, the selection bias, groups scored by their
        two best, renormalised with norm_topk_prob, x routed_scaling_factor."""
        groups = {k: read(raw, k, Field("int", high=2**16), d) for k, d in (("n_group", 8), ("topk_group", 4))}
        return {"scoring": "sigmoid", "selection_bias": True, **groups, "group_score": "top2_sum",
                "normalization": "renormalize" if read(raw, "norm_topk_prob", Field("bool"), True) else "none",
                "routed_scaling_factor": read(raw, "routed_scaling_factor", Field("float"), 2.5)}

    def routing_of(self, cfg: MoEConfig) -> dict[str, Any]:
        return {"scoring": "sigmoid", "selection_bias": True, "group_score": "top2_sum"}

    def to_hf_dict(self, cfg: MoEConfig) -> dict[str, Any]:
        d = super().to_hf_dict(cfg)
        d.pop("topk_method")
        return {**d, "rope_interleave": cfg.rope_layout != "half", "norm_topk_prob": cfg.normalization == "renormalize"}

    def ignorable(self, name: str, shape: tuple[int, ...], cfg: MoEConfig) -> bool:
        """A multi-token-prediction layer (the checkpoint's layers past num_hidden_layers): not read."""
        found = _LAYER.match(name)
        return bool(found and int(found.group(1)) >= cfg.num_hidden_layers) or super().ignorable(name, shape, cfg)
