"""DeepSeek-V2 and V2-Lite (DeepseekV2ForCausalLM), as transformers' deepseek_v2 modeling file computes it.

Attention is MLA (``models/mla.py``): ``kv_lora_rank``, ``q_lora_rank`` (null in V2-Lite: a plain q_proj),
``qk_nope_head_dim`` + ``qk_rope_head_dim`` (mixport's head_dim, as transformers sets it), ``v_head_dim``;
RoPE turns interleaved pairs and keeps them interleaved (its complex product). ``attention_bias``: biases
on q_a_proj, kv_a_proj_with_mqa and o_proj. The KV cache holds the normed latent and the roped key.
Feed-forward: the first ``first_k_dense_replace`` layers are dense SwiGLU MLPs (``intermediate_size``);
the others route to ``n_routed_experts`` experts (``moe_intermediate_size``) and add ``n_shared_experts``
ungated shared experts as one MLP ``mlp.shared_experts`` of width moe_intermediate_size * n_shared_experts.
Routing: softmax over fp32 logits, ``topk_method`` greedy (top-k) or group_limited_greedy (experts of the
``topk_group`` best of ``n_group`` groups, a group scored by its best expert), no renormalisation
(transformers' V2 ignores ``norm_topk_prob``), weights x ``routed_scaling_factor``.
Names: ``mlp.gate`` (router), ``mlp.experts.{e}.gate_proj`` ... (hub) or stacked ``mlp.experts.gate_up_proj``
/ ``down_proj`` (transformers 5), ``mlp.shared_experts.*``, a dense layer's ``mlp.gate_proj`` ....
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mixport.config_fields import FIELDS, Field
from mixport.errors import ConfigError
from mixport.models import rope
from mixport.models.adapter import Adapter, read, refuse_window
from mixport.models.config import MoEConfig
from mixport.typed_json import shown

if TYPE_CHECKING:
    from torch import nn

_V5_EXPERTS = r"^layers\.(\d+)\.mlp\.experts\."
_FLAG = Field("bool")
_COUNT = Field("int", low=0, high=2**12)
_RANK = Field("int", high=2**18, nullable=True)


class DeepseekV2(Adapter):
    model_type = "deepseek_v2"
    architectures = ("DeepseekV2ForCausalLM",)
    hf_class = "DeepseekV2ForCausalLM"

    hf_fields = {"intermediate_size": "moe_intermediate_size", "num_local_experts": "num_experts",
                 "dense_intermediate_size": "intermediate_size", "head_dim": "qk_rope_head_dim",
                 "kv_lora_rank": "kv_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim", "v_head_dim": "v_head_dim",
                 "qkv_bias": "attention_bias", "o_bias": "attention_bias", "normalization": None,
                 "sliding_window": None}  # DeepseekV2Config has none (refuse_window)
    aliases = {"num_local_experts": ("n_routed_experts",)}  # num_experts (attribute_map) wins over it, as in
    #                                                           transformers; the hub's configs give n_routed_experts
    derives = ("q_lora_rank", "shared_expert_intermediate_size", "dense_layers", "rope_layout", "n_group",
               "topk_group", "routed_scaling_factor")
    defaults = {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "bos_token_id": 1,
                "eos_token_id": 2, "dense_intermediate_size": 11008, "intermediate_size": 1407,
                "num_local_experts": 64, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "v_head_dim": 128,
                "head_dim": 64, "normalization": "none"}
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts_per_tok")
    rope_layout = "pairs"  # V2 rotates interleaved pairs and keeps them so (apply_rotary_emb's complex product)
    rope_types = ("default", "yarn")  # DeepSeek's configs use YaRN (mscale / mscale_all_dim: models/mla.py)
    shared_default = 2  # n_shared_experts when config.json omits it
    dense_default = 0  # first_k_dense_replace when config.json omits it

    router_path = "mlp.gate"
    experts_path = "mlp.experts"
    expert_projections = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    shared_path = "shared_experts"
    stacked_experts = ((_V5_EXPERTS + r"gate_up_proj$", "gate_up"), (_V5_EXPERTS + r"down_proj$", "down"))

    # config ------------------------------------------------------------------------------
    def derived(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        refuse_window(raw, self.name)
        self.check_variant(raw)
        heads, layers = raw["num_attention_heads"], raw["num_hidden_layers"]
        kv = raw.get("num_key_value_heads")
        q_rank = read(raw, "q_lora_rank", _RANK, 1536)
        first_dense = read(raw, "first_k_dense_replace", _COUNT, self.dense_default)
        shared = read(raw, "n_shared_experts", _COUNT, self.shared_default)
        moe_width = raw.get("moe_intermediate_size", self.defaults["intermediate_size"])
        if not FIELDS["intermediate_size"].accepts(moe_width):  # before it multiplies
            raise ConfigError("config.json field 'moe_intermediate_size' must be "
                              f"{FIELDS['intermediate_size'].expected()}", given=shown(moe_width))
        return {"model_type": self.model_type, "num_key_value_heads": heads if kv is None else kv,
                "head_dim": raw.get("qk_rope_head_dim", self.defaults["head_dim"]),
                **rope.from_hf(raw, float(self.defaults["rope_theta"]), types=self.rope_types),
                "q_lora_rank": q_rank or 0, "shared_expert_intermediate_size": moe_width * shared,
                "dense_layers": tuple(range(min(first_dense, layers))), "rope_layout": self.rope_layout,
                **self.routing(raw)}

    def check_variant(self, raw: Mapping[str, Any]) -> None:
        """What transformers' DeepseekV2 builds and mixport does not: refused by the config.json key."""
        if read(raw, "mlp_bias", _FLAG, False):
            raise ConfigError("config.json field 'mlp_bias' is true: MLP biases are not implemented",
                              given="true", expected="false (DeepSeek's released configs)")
        freq = read(raw, "moe_layer_freq", Field("int"), 1)
        if freq != 1:
            raise ConfigError("config.json field 'moe_layer_freq' is not 1", given=shown(freq),
                              expected="1 (transformers' DeepSeek ignores it: every layer from first_k_dense_replace "
                                       "on is sparse)")
        if raw["hidden_size"] % raw["num_attention_heads"]:  # DeepseekV2Config.validate_architecture
            raise ConfigError("config.json field 'hidden_size' is not a multiple of 'num_attention_heads'",
                              given=f"{raw['hidden_size']} / {raw['num_attention_heads']}",
                              expected="an integer ratio (transformers refuses it too)")
        check_mla(raw)

    def routing(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The TopKRouting fields of DeepseekV2TopkRouter: softmax, greedy or group_limited_greedy (groups
        scored by their best expert), no renormalisation, x routed_scaling_factor."""
        method = read(raw, "topk_method", Field("str", nullable=True), "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise ConfigError("config.json field 'topk_method' names a selection DeepseekV2 does not have",
                              given=shown(method), expected='"greedy" | "group_limited_greedy"')
        groups = {"n_group": 1, "topk_group": 1}
        if method == "group_limited_greedy":  # transformers reads both as given (null: it fails)
            groups = {k: read(raw, k, Field("int", high=2**16), None) for k in groups}
            for key, value in groups.items():
                if value is None:
                    raise ConfigError(f"config.json field '{key}' is needed by topk_method group_limited_greedy",
                                      given="null or missing", expected="an integer >= 1")
        return {"scoring": "softmax", "normalization": "none", **groups, "group_score": "max",
                "routed_scaling_factor": read(raw, "routed_scaling_factor", Field("float"), 1.0)}

    def validate(self, cfg: MoEConfig) -> None:
        super().validate(cfg)
        if cfg.dense_layers and not cfg.dense_intermediate_size:
            raise ConfigError("config.json field 'intermediate_size' must be > 0 when first_k_dense_replace > 0",
                              given="0", expected="the dense MLP's width")

    def conform(self, cfg: MoEConfig) -> MoEConfig:
        """As ``Adapter.conform``, and MLA as this family has it: one kv head per head, the MLA widths (when
        unset: kv_lora_rank 2 x head_dim, q/k and v heads of head_dim), its RoPE layout, a shared width that is
        a whole number of experts' and dense layers that come first."""
        from dataclasses import replace

        cfg = super().conform(cfg)
        d, width = cfg.head_dim, cfg.intermediate_size
        return replace(cfg, **self.routing_of(cfg), num_key_value_heads=cfg.num_attention_heads,
                       kv_lora_rank=cfg.kv_lora_rank or 2 * d,
                       qk_nope_head_dim=cfg.qk_nope_head_dim or d, v_head_dim=cfg.v_head_dim or d,
                       rope_layout=self.layout_of(cfg.rope_layout), dense_layers=tuple(range(len(cfg.dense_layers))),
                       shared_expert_intermediate_size=-(-cfg.shared_expert_intermediate_size // width) * width)

    def routing_of(self, cfg: MoEConfig) -> dict[str, Any]:
        """The routing fields this family computes, for ``conform`` (V2: softmax, groups by their max)."""
        return {"scoring": "softmax", "normalization": "none", "group_score": "max", "selection_bias": False}

    def layout_of(self, layout: str) -> str:
        """The RoPE layout this family has closest to ``layout`` (V2: only interleaved pairs)."""
        return self.rope_layout

    def to_hf_dict(self, cfg: MoEConfig) -> dict[str, Any]:
        shared, rest = divmod(cfg.shared_expert_intermediate_size, cfg.intermediate_size)
        if rest or cfg.dense_layers != tuple(range(len(cfg.dense_layers))):
            raise ConfigError("this config has no DeepSeek config.json", given=f"shared width "
                              f"{cfg.shared_expert_intermediate_size}, dense layers {cfg.dense_layers}",
                              expected="a multiple of intermediate_size; dense layers 0..k-1")
        return {**super().to_hf_dict(cfg), "hidden_act": "silu", "qk_rope_head_dim": cfg.head_dim,
                "q_lora_rank": cfg.q_lora_rank or None, "n_shared_experts": shared,
                "first_k_dense_replace": len(cfg.dense_layers), "n_group": cfg.n_group, "topk_group": cfg.topk_group,
                "topk_method": "group_limited_greedy" if cfg.n_group > 1 else "greedy",
                "routed_scaling_factor": cfg.routed_scaling_factor}

    # reference model ---------------------------------------------------------------------
    def decoder_layer(self, cfg: MoEConfig, index: int) -> nn.Module:
        """The family's layer with MLA in place of grouped-query attention."""
        from mixport.models.mla import MLAttention

        layer = super().decoder_layer(cfg, index)
        layer.self_attn = MLAttention(cfg)
        return layer


def check_mla(raw: Mapping[str, Any]) -> None:
    """MLA's keys where transformers' DeepSeek would build no working attention."""
    read(raw, "kv_lora_rank", Field("int", high=2**18), 512)  # 0: no latent to cache
    if raw.get("v_head_dim", 1) is None:
        raise ConfigError("config.json field 'v_head_dim' must be a positive integer", given="null",
                          expected="each value head's width")
