"""GPT-OSS (GptOssForCausalLM): attention sinks, alternating sliding / full attention, biased
router and experts with a clamped SwiGLU.

Attention: q/k/v/o carry a bias (``attention_bias``); each head has a learned sink logit
(``self_attn.sinks`` [Q]) that joins its softmax and is dropped after; the layers ``layer_types``
marks "sliding_attention" see the last ``sliding_window`` tokens (transformers' default: even
layers sliding, window 128). Routing: ``mlp.router`` is a Linear with a bias, then the top-k of
the logits and a softmax over those k (TopKRouting order ``topk_softmax``, no renormalization).
Experts, transformers 5 layout: ``mlp.experts.gate_up_proj`` [E, H, 2F] with the gate and up
columns INTERLEAVED (``[..., ::2]`` is the gate), ``gate_up_proj_bias`` [E, 2F] (interleaved the
same way), ``down_proj`` [E, F, H], ``down_proj_bias`` [E, H]; the FFN is
(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(gate, limit) (``swiglu_alpha``
1.702, ``swiglu_limit`` 7.0). mixport splits each expert into gate / up / down Linear weights
([out, in]: the stored [in, out] slices read transposed) and biases, de-interleaved here, so the fused
MoE node's gate_up is gate-first like every other family's. Hub checkpoints store the expert
weights as MXFP4 ``*_blocks`` / ``*_scales`` pairs:
``exporter/mxfp4.py`` dequantizes them on read, one expert at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from mixport.config_fields import Field
from mixport.errors import ConfigError
from mixport.models.adapter import TRANSPOSE, Adapter, Renamed, Shape, read
from mixport.models.config import MoEConfig
from mixport.typed_json import shown

if TYPE_CHECKING:
    from torch import nn

_EXPERTS = r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|gate_up_proj_bias|down_proj|down_proj_bias)$"
_TYPES = ("full_attention", "sliding_attention")


class GptOss(Adapter):
    model_type = "gpt_oss"
    architectures = ("GptOssForCausalLM",)
    hf_class = "GptOssForCausalLM"

    hf_fields = {"qkv_bias": "attention_bias", "o_bias": "attention_bias", "swiglu_alpha": "swiglu_alpha",
                 "swiglu_limit": "swiglu_limit", "normalization": None, "sliding_window": None}
    aliases = {"num_local_experts": ("num_experts",)}
    defaults = {"rope_theta": 150000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
                "qkv_bias": True, "o_bias": True, "normalization": "none", "routing_order": "topk_softmax",
                "attention_sinks": True, "router_bias": True, "expert_bias": True,
                "expert_activation": "swiglu_clamped", "swiglu_alpha": 1.702, "swiglu_limit": 7.0,
                "bos_token_id": None, "eos_token_id": None}
    kv_heads_default = 8  # GptOssConfig's num_key_value_heads
    rope_default = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                    "original_max_position_embeddings": 4096}  # GptOssConfig's when config.json names no rope
    derives = ("sliding_window", "sliding_layers")

    router_path = "mlp.router"
    experts_path = "mlp.experts"
    expert_projections = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

    fast_graph = True  # GroupQueryAttention's head_sink is the sinks; the experts' biases: ort_layers

    def derived(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        given = raw if "head_dim" in raw else {**raw, "head_dim": 64}  # GptOssConfig's default (null: hidden / heads)
        return {**super().derived(given), **self.window(raw, raw["num_hidden_layers"])}

    def validate(self, cfg: MoEConfig) -> None:
        super().validate(cfg)
        if cfg.qkv_bias != cfg.o_bias:
            raise ConfigError("GPT-OSS puts attention_bias on q/k/v and o alike", given=f"{cfg.qkv_bias}",
                              expected="one attention_bias")

    def window(self, raw: Mapping[str, Any], layers: int) -> dict[str, Any]:
        """sliding_window / sliding_layers from ``layer_types`` (absent: transformers' default, even
        layers sliding) and ``sliding_window`` (absent: 128)."""
        types = raw.get("layer_types")
        if types is None:
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
        if not isinstance(types, list) or len(types) != layers or any(t not in _TYPES for t in types):
            raise ConfigError("config.json field 'layer_types' must list each layer's attention", given=shown(types),
                              expected=f'{layers} entries, each "full_attention" or "sliding_attention"')
        window = read(raw, "sliding_window", Field("int", high=2**24, nullable=True), 128)
        sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        if sliding and window is None:
            raise ConfigError("config.json marks sliding_attention layers but 'sliding_window' is null",
                              given=f"layer_types {shown(types)}", expected="a sliding_window (GPT-OSS: 128)")
        return {"sliding_window": window if sliding else None, "sliding_layers": sliding if sliding else None}

    def checkpoint_names(self, hf_name: str, shape: Shape) -> Iterator[Renamed]:
        """The stacked experts [in, out] -> per expert gate / up / down Linear weights [out, in] (read
        transposed) and biases, the interleaved gate|up columns split (even: gate, odd: up)."""
        import re

        found = re.search(_EXPERTS, hf_name.removeprefix(self.hub_prefix))
        if found is None:
            yield from super().checkpoint_names(hf_name, shape)
            return
        layer, kind = int(found.group(1)), found.group(2)
        for e in range(shape[0]):
            if kind == "gate_up_proj":
                f = shape[2] // 2
                for role, first in (("gate", 0), ("up", 1)):  # interleaved columns: even gate, odd up
                    yield self.expert_weight(layer, e, role), (f, shape[1]), \
                        (e, slice(None), slice(first, None, 2), TRANSPOSE)
            elif kind == "gate_up_proj_bias":
                f = shape[1] // 2
                yield self.expert_bias(layer, e, "gate"), (f,), (e, slice(0, None, 2))
                yield self.expert_bias(layer, e, "up"), (f,), (e, slice(1, None, 2))
            elif kind == "down_proj":
                yield self.expert_weight(layer, e, "down"), (shape[2], shape[1]), (e, TRANSPOSE)
            else:
                yield self.expert_bias(layer, e, "down"), tuple(shape[1:]), (e,)

    def expert_bias(self, layer: int, expert: int, role: str) -> str:
        return self.expert_weight(layer, expert, role).removesuffix(".weight") + ".bias"

    def decoder_layer(self, cfg: MoEConfig, index: int) -> nn.Module:
        from mixport.models.gpt_oss_layers import decoder_layer

        return decoder_layer(cfg, index, self.layout())

    def to_hf_dict(self, cfg: MoEConfig) -> dict[str, Any]:
        types = ["sliding_attention" if cfg.window(i) else "full_attention" for i in range(cfg.num_hidden_layers)]
        return {**super().to_hf_dict(cfg), "hidden_act": "silu", "layer_types": types,
                "sliding_window": cfg.sliding_window or 128,  # transformers builds the sliding mask even when no
                "attention_bias": cfg.qkv_bias}               # layer uses it, and refuses a null window there
