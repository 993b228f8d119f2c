"""Qwen2-MoE (Qwen2MoeForCausalLM): routed experts plus one gated shared expert, q/k/v bias.

Hub checkpoints name the router ``mlp.gate``, the experts ``mlp.experts.{e}.gate_proj / up_proj
/ down_proj``, the shared expert ``mlp.shared_expert.*`` and its gate ``mlp.shared_expert_gate``
(Linear H -> 1, applied through a sigmoid); transformers 5 stacks the experts in memory
(``mlp.experts.gate_up_proj`` [E, 2F, H], ``down_proj`` [E, H, F]) and folders saved that way
are read too. Routing: softmax -> top-k, renormalized when ``norm_topk_prob`` (false in released
configs). Layers in ``mlp_only_layers``, or off the ``decoder_sparse_step`` grid, hold a dense
SwiGLU MLP (``mlp.gate_proj`` ...) of width ``intermediate_size``; routed experts are
``moe_intermediate_size`` wide. Sliding-window attention applies to the layers ``layer_types``
marks "sliding_attention" when ``use_sliding_window`` is set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mixport.config_fields import Field
from mixport.errors import ConfigError
from mixport.models.adapter import Adapter, read
from mixport.models.config import MoEConfig
from mixport.typed_json import shown

_V5_EXPERTS = r"^layers\.(\d+)\.mlp\.experts\."
_FLAG, _STEP = Field("bool"), Field("int", high=2**12)


def sparse_step_layers(raw: Mapping[str, Any], layers: int) -> tuple[int, ...]:
    """The dense-MLP layers of a Qwen-style config: ``mlp_only_layers``, and every layer i with
    (i + 1) % decoder_sparse_step != 0 (transformers' rule)."""
    only = read(raw, "mlp_only_layers", Field("layers", nullable=True), []) or []
    step = read(raw, "decoder_sparse_step", _STEP, 1)
    if any(i >= layers for i in only):
        raise ConfigError("config.json field 'mlp_only_layers' names a layer the model does not have",
                          given=f"{shown(only)} ({layers} layers)", expected=f"layer indices in [0, {layers})")
    dense = tuple(i for i in range(layers) if i in only or (i + 1) % step)
    if len(dense) == layers:
        raise ConfigError("config.json fields 'mlp_only_layers' and 'decoder_sparse_step' leave no layer with "
                          "experts", given=f"mlp_only_layers {shown(only)}, decoder_sparse_step {step}, "
                                       f"{layers} layers", expected="at least one sparse-MoE layer")
    return dense


def norm_topk(raw: Mapping[str, Any], default: bool) -> str:
    return "renormalize" if read(raw, "norm_topk_prob", _FLAG, default) else "none"


class Qwen2Moe(Adapter):
    model_type = "qwen2_moe"
    architectures = ("Qwen2MoeForCausalLM",)
    hf_class = "Qwen2MoeForCausalLM"

    hf_fields = {"intermediate_size": "moe_intermediate_size", "num_local_experts": "num_experts",
                 "dense_intermediate_size": "intermediate_size", "qkv_bias": "qkv_bias",
                 "shared_expert_intermediate_size": "shared_expert_intermediate_size",
                 "normalization": None, "sliding_window": None}
    aliases = {"num_local_experts": ("num_local_experts",)}
    defaults = {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "qkv_bias": True,
                "dense_intermediate_size": 5632, "shared_expert_intermediate_size": 5632,
                "shared_expert_gate": True, "bos_token_id": None, "eos_token_id": None}
    kv_heads_default = 16  # Qwen2MoeConfig's num_key_value_heads

    router_path = "mlp.gate"
    experts_path = "mlp.experts"
    expert_projections = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    derives = ("normalization", "dense_layers", "sliding_window", "sliding_layers")
    stacked_experts = ((_V5_EXPERTS + r"gate_up_proj$", "gate_up"), (_V5_EXPERTS + r"down_proj$", "down"))

    fast_graph = True

    def ignorable(self, name: str, shape: tuple[int, ...], cfg: MoEConfig) -> bool:
        """transformers keeps a zero-width shared expert's gate; its output is multiplied by 0."""
        zero_shared = not cfg.shared_expert_intermediate_size and name.endswith(f".{self.shared_gate_path}.weight")
        return zero_shared or super().ignorable(name, shape, cfg)

    def derived(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        layers = raw["num_hidden_layers"]
        return {**super().derived(raw), "normalization": norm_topk(raw, False),
                "dense_layers": sparse_step_layers(raw, layers), **self.window(raw, layers)}

    def window(self, raw: Mapping[str, Any], layers: int) -> dict[str, Any]:
        """sliding_window / sliding_layers: the window on the layers ``layer_types`` marks (or, without
        layer_types, transformers' rule: every other layer below ``max_window_layers``)."""
        types = raw.get("layer_types")
        use = read(raw, "use_sliding_window", _FLAG, False)
        if types is not None and (not isinstance(types, list) or len(types) != layers
                                  or any(t not in ("full_attention", "sliding_attention") for t in types)):
            raise ConfigError("config.json field 'layer_types' must list each layer's attention",
                              given=shown(types), expected=f'{layers} entries, each "full_attention" or '
                                                           '"sliding_attention"')
        if not use:
            if types is not None and "sliding_attention" in types:
                raise ConfigError("config.json marks sliding_attention layers but use_sliding_window is false",
                                  given=f"layer_types {shown(types)}",
                                  expected="use_sliding_window true with a sliding_window, or only full_attention")
            return {"sliding_window": None, "sliding_layers": None}
        window = read(raw, "sliding_window", Field("int", high=2**24), 4096)
        if types is None:
            top = read(raw, "max_window_layers", Field("int", low=0, high=2**12), 28)
            types = ["sliding_attention" if (i + 1) % 2 and i < top else "full_attention" for i in range(layers)]
        return {"sliding_window": window,
                "sliding_layers": tuple(i for i, t in enumerate(types) if t == "sliding_attention")}

    def to_hf_dict(self, cfg: MoEConfig) -> dict[str, Any]:
        window = cfg.sliding_window is not None
        types = ["sliding_attention" if cfg.window(i) else "full_attention" for i in range(cfg.num_hidden_layers)]
        return {**super().to_hf_dict(cfg), **qwen_hf_fields(cfg), "use_sliding_window": window,
                "sliding_window": cfg.sliding_window if window else 0, "layer_types": types}


def qwen_hf_fields(cfg: MoEConfig) -> dict[str, Any]:
    """The config.json keys of the Qwen rules MoEConfig holds in other forms."""
    return {"hidden_act": "silu", "mlp_only_layers": list(cfg.dense_layers), "decoder_sparse_step": 1,
            "norm_topk_prob": cfg.normalization == "renormalize"}
