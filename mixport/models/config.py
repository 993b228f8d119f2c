"""The model configuration mixport works with: one dataclass for every family (no torch).

A family's adapter maps its config.json onto these fields (``Adapter.config_from_hf``);
the export's manifest records them as ``config`` (``dataclasses.asdict``). A field a new
family needs is added here with a neutral default (the value under which every existing
family behaves as before), so that older manifests and adapters stay valid, and its type and
range are declared in ``mixport.config_fields.FIELDS`` (checked for config.json and manifests).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

from mixport.ops import RoutingSpec

DEFAULT_MODEL_TYPE = "mixtral"  # what a manifest without ``model_type`` (written before the adapters) holds


@dataclass(frozen=True)
class MoEConfig:
    """A sparse-MoE decoder: the fields the reference model, exporter and runtimes need."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # of one routed expert
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    normalization: str = "renormalize"  # "renormalize" (Mixtral) | "none"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    model_type: str = DEFAULT_MODEL_TYPE  # the family: its adapter's key in mixport.models.registry
    # -- routing (the TopKRouting node's attributes) ---------------------------------------
    routing_order: str = "softmax_topk"  # "softmax_topk" (Mixtral, Qwen, OLMoE) | "topk_softmax" (Granite)
    scoring: str = "softmax"  # "softmax" | "sigmoid" (DeepSeek-V3) | "sparsemixer" (PhiMoE, top-2)
    n_group: int = 1  # expert groups for grouped top-k (DeepSeek); 1: plain top-k
    topk_group: int = 1  # groups kept
    group_score: str = "max"  # a group's score: "max" (DeepSeek-V2) | "top2_sum" (DeepSeek-V3)
    routed_scaling_factor: float = 1.0  # x the final routing weights
    selection_bias: bool = False  # the router holds e_score_correction_bias [E] (selection only, DeepSeek-V3)
    sparsemixer_eps: float = 0.0  # sparsemixer's threshold eps (PhiMoE's router_jitter_noise)
    # -- attention ----------------------------------------------------------------------------
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2-MoE; attention_bias elsewhere)
    o_bias: bool = False  # the output projection carries a bias (OLMoE / Granite attention_bias)
    qk_norm: str = "none"  # "none" | "head" (RMSNorm over head_dim, Qwen3) | "projection" (over the width, OLMoE)
    clip_qkv: float | None = None  # clamp q, k, v to [-clip, clip] after the norms (OLMoE)
    attention_scale: float | None = None  # softmax scale; None: head_dim ** -0.5 (Granite: attention_multiplier)
    sliding_layers: tuple[int, ...] | None = None  # layers with the sliding window; None: all (when it is set)
    attention_sinks: bool = False  # a learned logit per query head joins each softmax, then is dropped (GPT-OSS)
    # MLA, multi-head latent attention (DeepSeek-V2/V3; models/mla.py): on when kv_lora_rank > 0. head_dim is
    # then the RoPE part of each q/k head (qk_rope_head_dim), as transformers' DeepSeek configs set it
    kv_lora_rank: int = 0  # the compressed kv width (cached, RMS-normed); 0: standard attention
    q_lora_rank: int = 0  # the compressed q width (q_a_proj -> norm -> q_b_proj); 0: a plain q_proj
    qk_nope_head_dim: int = 0  # each q/k head's width without RoPE
    v_head_dim: int = 0  # each value head's width
    rope_layout: str = "half"  # rotated dims: "half" (rotate_half) | "pairs" (interleaved pairs, kept so:
    #                            DeepSeek-V2) | "pairs_to_half" (pairs in, halves out: DeepSeek-V3 rope_interleave)
    # -- feed-forward ---------------------------------------------------------------------------
    shared_expert_intermediate_size: int = 0  # one shared SwiGLU expert on every token; 0: none
    shared_expert_gate: bool = False  # the shared expert is scaled by sigmoid(x @ gate) (Qwen2-MoE)
    dense_layers: tuple[int, ...] = ()  # decoder layers with a dense SwiGLU MLP instead of experts
    dense_intermediate_size: int = 0  # that MLP's width
    router_bias: bool = False  # the router Linear carries a bias (GPT-OSS)
    expert_bias: bool = False  # each routed expert's gate, up and down projections carry biases (GPT-OSS)
    expert_activation: str = "swiglu"  # "swiglu" | "swiglu_clamped" (GPT-OSS: ops.py MoE contract)
    swiglu_alpha: float = 1.702  # swiglu_clamped: out = (up + 1) * gate * sigmoid(alpha * gate) ...
    swiglu_limit: float = 7.0  # ... after gate = min(gate, limit), up = clamp(up, -limit, limit)
    # -- muP scalars (Granite) -------------------------------------------------------------------
    embedding_multiplier: float = 1.0  # embeddings x this
    residual_multiplier: float = 1.0  # each block's output x this before the residual add
    logits_scaling: float = 1.0  # logits / this
    # -- rope scaling (mixport/models/rope.py; rope_parameters / rope_scaling in config.json) ------------
    rope_type: str = "default"  # "default" | "yarn" | "longrope"
    rope_factor: float | None = None  # yarn / longrope scale; None: max_position_embeddings / rope_original_max
    rope_original_max: int | None = None  # original_max_position_embeddings (pretraining context)
    rope_attention_factor: float | None = None  # cos/sin x this; None: the type's formula
    rope_beta_fast: float | None = None  # yarn ramp (None: 32)
    rope_beta_slow: float | None = None  # yarn ramp (None: 1)
    rope_mscale: float | None = None  # yarn (DeepSeek)
    rope_mscale_all_dim: float | None = None  # yarn (DeepSeek): also scales the softmax (rope.mscale_scale)
    rope_truncate: bool = True  # yarn: floor/ceil the correction range (GPT-OSS: false)
    rope_short_factor: tuple[float, ...] | None = None  # longrope, [rope_dim / 2]
    rope_long_factor: tuple[float, ...] | None = None  # longrope, past rope_original_max
    rope_short_mscale: float | None = None  # longrope (Phi-3.5-MoE's own cos/sin scale, short / long)
    rope_long_mscale: float | None = None
    # -- norms and the head (PhiMoE) -------------------------------------------------------------
    norm_type: str = "rms"  # "rms" (RMSNorm) | "layer" (LayerNorm with bias, eps rms_norm_eps: PhiMoE)
    lm_head_bias: bool = False  # lm_head carries a bias (PhiMoE's lm_head_bias)

    def routing(self) -> RoutingSpec:
        """What each TopKRouting node computes (``ops.py``)."""
        return RoutingSpec(k=self.num_experts_per_tok, normalization=self.normalization, order=self.routing_order,
                           scoring=self.scoring, bias=self.selection_bias, n_group=self.n_group,
                           topk_group=self.topk_group, group_score=self.group_score,
                           scaling=self.routed_scaling_factor, eps=self.sparsemixer_eps)

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def scale(self) -> float:
        """The attention softmax scale."""
        return self.head_dim**-0.5 if self.attention_scale is None else self.attention_scale

    @property
    def mla(self) -> bool:
        """Multi-head latent attention (DeepSeek) instead of grouped-query attention."""
        return self.kv_lora_rank > 0

    def cache_dims(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(heads, width) of each layer's cached key and value tensors (``config_fields.cache_dims``)."""
        from mixport.config_fields import cache_dims

        return cache_dims({"num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
                           "kv_lora_rank": self.kv_lora_rank})

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` routes to experts (else it has a dense MLP)."""
        return layer not in self.dense_layers

    def window(self, layer: int) -> int | None:
        """The sliding window of decoder layer ``layer`` (None: full attention)."""
        if self.sliding_window is None or (self.sliding_layers is not None and layer not in self.sliding_layers):
            return None
        return self.sliding_window


def defaults() -> dict[str, Any]:
    """Each field that has a default, with it (the neutral value a newer field takes in older files)."""
    return {f.name: f.default for f in fields(MoEConfig) if f.default is not MISSING}


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(MoEConfig))
