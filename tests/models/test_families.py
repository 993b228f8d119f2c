"""Each family's config.json reading against transformers' own config and model classes.

For a minimal config.json (only the keys mixport requires), with other families' keys added,
and with each family's switches set, mixport's ``MoEConfig`` must describe the model transformers
builds from the same file: the same weights (names and shapes, through the adapter's renaming),
norms' epsilon, RoPE theta, attention scale, per-layer windows, q/k/v clipping, muP scalars,
token ids, and the same routing (the router module, run on one input). Both models are built on
the meta device, so transformers' full-size defaults cost nothing. Unsupported variants are
refused with one line naming the config.json field (the library and ``mixport export``).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mixport.config_fields import FIELDS
from mixport.errors import ConfigError
from mixport.exporter.loader import expected_shapes
from mixport.exporter.tiny import write_tiny
from mixport.models import registry, rope
from mixport.models.adapter import COMMON, Adapter
from mixport.models.components import Router
from mixport.models.config import MoEConfig, field_names
from tests.conftest import tiny_config
from tests.helpers import invoke, one_line_error, require_module

transformers = require_module("transformers")  # skips locally, fails under CI=true

DROP = object()  # a key left out of config.json
SIZES = {"vocab_size": 50304, "hidden_size": 72, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_experts_per_tok": 3}  # vocab holds OLMoE's default eos (50279); hidden 72: not a multiple of 64
MINIMAL: dict[str, dict[str, Any]] = {  # model_type -> the keys mixport requires, nothing else
    "mixtral": {**SIZES, "intermediate_size": 40, "num_local_experts": 10, "num_attention_heads": 8,
                "hidden_size": 80},
    "qwen2_moe": {**SIZES, "moe_intermediate_size": 40, "num_experts": 10, "num_attention_heads": 16,
                  "hidden_size": 96},
    "qwen3_moe": {**SIZES, "moe_intermediate_size": 40, "num_experts": 10, "num_attention_heads": 8,
                  "hidden_size": 80},
    "olmoe": {**SIZES, "intermediate_size": 40, "num_experts": 10},
    "granitemoe": {**SIZES, "intermediate_size": 40, "num_local_experts": 10},
    "granitemoeshared": {**SIZES, "intermediate_size": 40, "num_local_experts": 10},
    "phimoe": {**SIZES, "intermediate_size": 40, "num_local_experts": 10, "num_attention_heads": 8,
               "hidden_size": 80, "num_experts_per_tok": 2},  # sparsemixer: top-2 only
    "gpt_oss": {**SIZES, "intermediate_size": 40, "num_local_experts": 10, "num_attention_heads": 16},
}  # heads: Mixtral's, Qwen2's, Qwen3's and GPT-OSS's configs default to 8, 16, 4 and 8 kv heads when the key is
#   absent (GPT-OSS: head_dim 64, alternating sliding / full layers with window 128, YaRN rope)
# every family's switch, as another family's config.json names it (values far from the defaults)
FOREIGN = {"qkv_bias": True, "attention_bias": True, "clip_qkv": 0.25, "qk_norm": "head", "q_norm": True,
           "attention_multiplier": 0.05, "embedding_multiplier": 12.0, "residual_multiplier": 0.3,
           "logits_scaling": 4.0, "shared_expert_intermediate_size": 24, "shared_intermediate_size": 24,
           "mlp_only_layers": [1], "decoder_sparse_step": 1, "norm_topk_prob": True, "use_sliding_window": True,
           "max_window_layers": 2, "moe_intermediate_size": 40, "num_experts": 10,
           "normalization": "none", "routing_order": "topk_softmax", "dense_layers": [0],
           "shared_expert_gate": False, "attention_scale": 0.5}
SWITCHES: dict[str, list[dict[str, Any]]] = {  # model_type -> config.json variants that change the model
    "mixtral": [{"sliding_window": 5, "num_key_value_heads": 2, "head_dim": 24, "rms_norm_eps": 1e-3}],
    "qwen2_moe": [
        {"num_key_value_heads": 2, "head_dim": 24, "norm_topk_prob": True, "qkv_bias": False,
         "shared_expert_intermediate_size": 24, "intermediate_size": 48, "mlp_only_layers": [1],
         "use_sliding_window": True, "sliding_window": 3,
         "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
        {"decoder_sparse_step": 3, "use_sliding_window": True, "max_window_layers": 2,  # windows by transformers'
         "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "tie_word_embeddings": True},  # rule
        {"num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [1], "eos_token_id": [5, 7]},
    ],
    "qwen3_moe": [
        {"head_dim": 24, "attention_bias": True, "norm_topk_prob": True, "use_sliding_window": True,
         "mlp_only_layers": [0, 2], "intermediate_size": 48},
        {"use_sliding_window": True, "sliding_window": 3, "num_local_experts": 12, "num_experts": DROP,
         "decoder_sparse_step": 3, "rope_theta": 5e5},
    ],
    "olmoe": [{"clip_qkv": 0.5, "attention_bias": True, "norm_topk_prob": True, "num_key_value_heads": 2,
               "num_local_experts": 12, "num_experts": DROP, "pad_token_id": None, "eos_token_id": 3}],
    "granitemoe": [{"attention_multiplier": 0.05, "embedding_multiplier": 12, "residual_multiplier": 0.3,
                    "logits_scaling": 4, "attention_bias": True, "num_key_value_heads": 1, "head_dim": 24}],
    "granitemoeshared": [{"shared_intermediate_size": 24, "embedding_multiplier": 12, "logits_scaling": 4,
                          "attention_multiplier": 0.05, "residual_multiplier": 0.3}],
    "phimoe": [{"attention_bias": True, "lm_head_bias": True, "router_jitter_noise": 0.2, "num_key_value_heads": 2,
                "rms_norm_eps": 1e-3, "max_position_embeddings": 64, "sliding_window": 6,
                "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 2.5, 3.0],
                                 "long_factor": [2.0, 3.0, 4.0, 5.0, 6.0], "original_max_position_embeddings": 16,
                                 "short_mscale": 1.1, "long_mscale": 1.3}}],
    "gpt_oss": [
        {"sliding_window": 3, "layer_types": ["full_attention", "sliding_attention", "sliding_attention"],
         "attention_bias": False, "swiglu_limit": 5.0, "num_key_value_heads": 2, "head_dim": 24,
         "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0,
                          "original_max_position_embeddings": 1024, "truncate": True}},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "num_experts": 12, "num_local_experts": DROP,
         "layer_types": ["full_attention"] * 3, "sliding_window": None, "num_key_value_heads": 16},
    ],
}


def _raw(model_type: str, **changes: Any) -> dict[str, Any]:
    """A config.json: the family's minimal keys with ``changes`` (DROP: without that key)."""
    raw = {**MINIMAL[model_type], "architectures": [registry.get(model_type).name], "model_type": model_type}
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not DROP}


def _hf_window(model_type: str, hc: Any, layer: int) -> int | None:
    """The window transformers' attention mask applies to ``layer`` (its modeling files, sdpa/eager)."""
    if model_type in ("qwen2_moe", "gpt_oss"):  # create_sliding_window_causal_mask on layer_types' sliding layers
        return hc.sliding_window if hc.layer_types[layer] == "sliding_attention" else None
    if model_type in ("qwen3_moe", "mixtral", "phimoe"):  # every layer, when config.sliding_window is set
        return hc.sliding_window
    return None  # OLMoE, Granite: create_causal_mask; a sliding_window key is ignored


def _routing(router_class: type, hc: Any, cfg: MoEConfig) -> None:
    """transformers' router module (a CPU copy) and mixport's Router (the config's whole routing spec:
    order, normalization, scoring, ...) pick and weigh the same experts."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(cfg.num_local_experts, cfg.hidden_size, generator=gen)
    x = torch.randn(64, cfg.hidden_size, generator=gen)
    with torch.device("cpu"):
        router, ours = router_class(hc).eval(), Router(cfg)
    with torch.no_grad():
        router.weight.copy_(weight)
        ours.weight.copy_(weight)
        _, theirs_w, theirs_ids = router(x)
        ours_w, ours_ids = ours(x)
    assert torch.equal(theirs_ids, ours_ids), "routing picks other experts"
    assert (theirs_w.float() - ours_w.float()).abs().max() <= 1e-6, "routing weighs the experts otherwise"


def _transformers_model(adapter: Adapter, raw: dict[str, Any]) -> tuple[Any, Any]:
    cls = adapter.transformers_class()
    hc = cls.config_class(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = cls(hc)
    return hc, model


def _facts(adapter: Adapter, raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(transformers' model, mixport's config) described alike."""
    cfg = adapter.config_from_hf(raw)
    hc, model = _transformers_model(adapter, raw)
    layers = model.model.layers
    theirs: dict[str, Any] = {"weights": {}}
    for hf_name, tensor in model.state_dict().items():
        for name, shape, _ in adapter.checkpoint_names(hf_name, tuple(tensor.shape)):
            theirs["weights"][name] = shape
    ours: dict[str, Any] = {"weights": {n: tuple(s) for n, s in expected_shapes(cfg).items()}}
    if hc.tie_word_embeddings:  # the reference keeps an lm_head of its own (loaded from the embeddings)
        theirs["weights"].setdefault("lm_head.weight", theirs["weights"]["embed_tokens.weight"])
    rope = hc.rope_parameters
    theirs.update(
        tie=hc.tie_word_embeddings, rope=(rope["rope_type"], float(rope["rope_theta"])),
        max_positions=hc.max_position_embeddings, tokens=(hc.bos_token_id, hc.eos_token_id, hc.pad_token_id),
        eps=sorted(getattr(m, "variance_epsilon", None) or m.eps for m in model.modules()
                   if hasattr(m, "variance_epsilon") or isinstance(m, torch.nn.LayerNorm)),
        scale=[layer.self_attn.scaling for layer in layers], head_dim=[layer.self_attn.head_dim for layer in layers],
        windows=[_hf_window(adapter.model_type, hc, i) for i in range(len(layers))],
        clip=hc.clip_qkv if "clip_qkv" in inspect.getsource(type(layers[0].self_attn).forward) else None,
        embedding=float(getattr(model.model, "embedding_multiplier", 1.0)),
        residual=[float(getattr(layer, "residual_multiplier", 1.0)) for layer in layers],
        logits=float(hc.logits_scaling) if "logits_scaling" in inspect.getsource(type(model).forward) else 1.0)
    with torch.device("meta"):
        ref = adapter.reference_model(cfg)
    ours.update(
        tie=cfg.tie_word_embeddings, rope=(cfg.rope_type, cfg.rope_theta), max_positions=cfg.max_position_embeddings,
        tokens=(cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id),
        eps=sorted(m.eps for m in ref.modules() if type(m).__name__ in ("RMSNorm", "LayerNorm")),
        scale=[cfg.scale] * cfg.num_hidden_layers, head_dim=[cfg.head_dim] * cfg.num_hidden_layers,
        windows=[cfg.window(i) for i in range(cfg.num_hidden_layers)], clip=cfg.clip_qkv,
        embedding=cfg.embedding_multiplier, residual=[cfg.residual_multiplier] * cfg.num_hidden_layers,
        logits=cfg.logits_scaling)
    routers = [(i, m) for i, layer in enumerate(layers) for m in layer.modules() if "Router" in type(m).__name__]
    theirs["moe_layers"], ours["moe_layers"] = [i for i, _ in routers], adapter.moe_layers(cfg)
    _routing(type(routers[0][1]), hc, cfg)
    return theirs, ours


def _cases() -> list[Any]:
    out = [pytest.param(mt, {}, id=f"{mt}-minimal") for mt in MINIMAL]
    out += [pytest.param(mt, FOREIGN, id=f"{mt}-foreign-keys") for mt in MINIMAL]
    out += [pytest.param(mt, sw, id=f"{mt}-switches{i}") for mt, sws in SWITCHES.items() for i, sw in enumerate(sws)]
    return out


@pytest.mark.parametrize(("model_type", "changes"), _cases())
def test_config_describes_the_model_transformers_builds(model_type: str, changes: dict[str, Any]) -> None:
    adapter = registry.get(model_type)
    raw = _raw(model_type, **changes)
    theirs, ours = _facts(adapter, raw)
    assert theirs.pop("weights") == ours.pop("weights")
    assert theirs == ours


def test_minimal_configs_take_transformers_defaults() -> None:
    """Spelled out for the fields a family defaults (the test above compares what they build)."""
    keys = {"rms_norm_eps": "rms_norm_eps", "max_position_embeddings": "max_position_embeddings",
            "tie_word_embeddings": "tie_word_embeddings", "bos_token_id": "bos_token_id",
            "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id",
            "num_key_value_heads": "num_key_value_heads"}
    family = {"qwen2_moe": {"qkv_bias": "qkv_bias", "dense_intermediate_size": "intermediate_size",
                            "shared_expert_intermediate_size": "shared_expert_intermediate_size"},
              "qwen3_moe": {"qkv_bias": "attention_bias", "o_bias": "attention_bias",
                            "dense_intermediate_size": "intermediate_size"},
              "olmoe": {"qkv_bias": "attention_bias", "o_bias": "attention_bias", "clip_qkv": "clip_qkv"},
              "granitemoe": {"qkv_bias": "attention_bias", "attention_scale": "attention_multiplier",
                             "embedding_multiplier": "embedding_multiplier", "logits_scaling": "logits_scaling",
                             "residual_multiplier": "residual_multiplier"},
              "granitemoeshared": {"shared_expert_intermediate_size": "shared_intermediate_size",
                                   "attention_scale": "attention_multiplier"},
              "gpt_oss": {"qkv_bias": "attention_bias", "o_bias": "attention_bias", "sliding_window": "sliding_window",
                          "swiglu_alpha": "swiglu_alpha", "swiglu_limit": "swiglu_limit"}}
    norm = {"qwen2_moe": "norm_topk_prob", "qwen3_moe": "norm_topk_prob", "olmoe": "norm_topk_prob"}
    for model_type in MINIMAL:
        adapter = registry.get(model_type)
        raw = _raw(model_type)
        cfg = adapter.config_from_hf(raw)
        hc, _ = _transformers_model(adapter, raw)
        for field, key in {**keys, **family.get(model_type, {})}.items():
            assert getattr(cfg, field) == getattr(hc, key), (model_type, field)
        assert cfg.rope_theta == hc.rope_parameters["rope_theta"], model_type
        assert cfg.head_dim == (getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads)
        if model_type in norm:
            assert (cfg.normalization == "renormalize") == getattr(hc, norm[model_type]), model_type


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe", "olmoe"])
def test_num_experts_and_num_local_experts_are_both_read(model_type: str) -> None:
    adapter = registry.get(model_type)
    a = adapter.config_from_hf(_raw(model_type, num_experts=12))
    b = adapter.config_from_hf(_raw(model_type, num_experts=DROP, num_local_experts=12))
    assert a == b and a.num_local_experts == 12
    _, model = _transformers_model(adapter, _raw(model_type, num_experts=DROP, num_local_experts=12))
    experts = len(model.model.layers[0].mlp.experts.gate_up_proj)
    # transformers' Qwen3 and OLMoE configs map num_local_experts onto num_experts; Qwen2MoeConfig has no
    # such map (it would build its default 60 experts): mixport reads the key there too, as the count it says
    assert experts == (60 if model_type == "qwen2_moe" else 12)


@pytest.mark.parametrize("model_type", ["mixtral", "granitemoe"])
def test_num_experts_is_not_a_mixtral_or_granite_key(model_type: str) -> None:
    """Their config classes read only num_local_experts (num_experts would be ignored): it is required."""
    with pytest.raises(ConfigError, match="lacks the field 'num_local_experts'"):
        registry.get(model_type).config_from_hf(_raw(model_type, num_local_experts=DROP, num_experts=10))


def test_another_familys_keys_change_nothing_in_a_mixtral_config() -> None:
    """COMMON: a key is read only where the family maps it."""
    adapter = registry.get("mixtral")
    assert adapter.config_from_hf(_raw("mixtral", **FOREIGN)) == adapter.config_from_hf(_raw("mixtral"))


# -- refusals: one line naming the config.json field ------------------------------------------

def own_keys(adapters: list[Adapter]) -> list[tuple[str, str, str]]:
    """(model_type, field, config.json key) of what each family reads from a key of its own."""
    return list({(a.model_type, a.hf_key(field)): (a.model_type, field, a.hf_key(field))
                 for a in adapters for field in field_names()
                 if a.hf_key(field) not in (None, field) or field not in COMMON and a.hf_key(field)}.values())


OWN_KEYS = own_keys([a for a in registry.ADAPTERS if a.model_type in MINIMAL])  # (DeepSeek's: test_deepseek.py)


def test_every_field_is_read_by_some_family() -> None:
    read = {field for _, field, _ in own_keys(list(registry.ADAPTERS))} | set(COMMON)  # + Mixtral's keys
    derived = {"normalization", "sliding_layers", "dense_layers", "routing_order", "qk_norm", "shared_expert_gate",
               *rope.FIELD_NAMES, "scoring", "norm_type",  # PhiMoE's sparsemixer and LayerNorm: the family's
               "n_group", "topk_group", "group_score", "routed_scaling_factor", "selection_bias",  # DeepSeek
               "attention_sinks", "router_bias", "expert_bias", "expert_activation",  # GPT-OSS's: by family
               "q_lora_rank", "rope_layout"}  # DeepSeek: from a nullable q_lora_rank, rope_interleave
    assert read | derived == set(field_names())  # derived: from norm_topk_prob, layer_types, ... or the family


@pytest.mark.parametrize(("model_type", "field", "key"), OWN_KEYS, ids=[f"{m}-{k}" for m, _, k in OWN_KEYS])
def test_a_familys_own_key_of_the_wrong_type_is_one_line_naming_it(model_type: str, field: str, key: str) -> None:
    for value in ("1", -1, [1]):  # a string, out of range (or a wrong sign), a list
        if FIELDS[field].accepts(value):
            continue
        with pytest.raises(ConfigError) as info:
            registry.get(model_type).config_from_hf(_raw(model_type, **{key: value}))
        assert "\n" not in str(info.value) and f"'{key}'" in str(info.value), str(info.value)
    assert registry.get(model_type).config_from_hf(_raw(model_type))  # the family's minimal config is fine


REFUSED = [  # (model_type, changes, fragments of the one line)
    ("qwen2_moe", {"rope_scaling": {"type": "dynamic", "factor": 4.0}}, ["'rope_scaling.type'", "dynamic"]),
    ("qwen3_moe", {"rope_parameters": {"rope_type": "llama3", "factor": 4.0, "rope_theta": 1e6}},
     ["'rope_parameters.rope_type'", "llama3"]),
    ("mixtral", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e6, "short_factor": [1.0] * 8}},
     ["'rope_parameters.long_factor' is missing"]),
    ("qwen3_moe", {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3}},
     ["'rope_scaling.short_factor' has the wrong length", "given: 3 numbers"]),
    ("qwen3_moe", {"rope_scaling": {"rope_type": "yarn", "factor": -4.0}}, ["'rope_scaling.factor' must be"]),
    ("olmoe", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "truncate": "no"}},
     ["'rope_scaling.truncate' must be true or false"]),
    ("mixtral", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}, "partial_rotary_factor": 0.5},
     ["'partial_rotary_factor'"]),
    ("olmoe", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, ["'rope_scaling.rope_type'", "linear"]),
    ("granitemoe", {"hidden_act": "gelu"}, ["'hidden_act'", '"gelu"', "silu"]),
    # transformers' OLMoE / Granite masks ignore a window, but their KV caches are cropped to it
    ("olmoe", {"sliding_window": 3}, ["'sliding_window'", "OlmoeForCausalLM", "given: 3"]),
    ("granitemoeshared", {"sliding_window": 4096}, ["'sliding_window'", "GraniteMoeSharedForCausalLM"]),
    ("qwen3_moe", {"hidden_act": "relu"}, ["'hidden_act'", '"relu"']),
    ("qwen2_moe", {"use_sliding_window": True, "layer_types": ["sliding_attention", "full_attention"]},
     ["'layer_types'", "3 entries"]),
    ("qwen2_moe", {"layer_types": ["full_attention", "sliding", "full_attention"]}, ["'layer_types'"]),
    ("qwen2_moe", {"layer_types": ["full_attention", "sliding_attention", "full_attention"]},
     ["sliding_attention", "use_sliding_window"]),
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": None}, ["'sliding_window'", "null"]),
    ("qwen2_moe", {"mlp_only_layers": [0, 3]}, ["'mlp_only_layers'", "a layer the model does not have", "3 layers"]),
    ("qwen3_moe", {"mlp_only_layers": [5]}, ["'mlp_only_layers'", "[0, 3)"]),
    ("qwen2_moe", {"mlp_only_layers": [0, 1, 2]}, ["'mlp_only_layers'", "'decoder_sparse_step'",
                                                   "no layer with experts"]),
    ("qwen3_moe", {"decoder_sparse_step": 4}, ["'decoder_sparse_step'", "no layer with experts"]),
    ("qwen2_moe", {"decoder_sparse_step": 0}, ["'decoder_sparse_step'", "given: 0"]),
    ("qwen2_moe", {"mlp_only_layers": [1], "intermediate_size": 0}, ["'intermediate_size'", "dense"]),
    ("olmoe", {"head_dim": 24}, ["'head_dim'", "hidden_size / num_attention_heads", "18"]),
    ("qwen2_moe", {"norm_topk_prob": "yes"}, ["'norm_topk_prob'", "true or false"]),
    ("olmoe", {"clip_qkv": -1}, ["'clip_qkv'", "given: -1"]),
    ("granitemoe", {"embedding_multiplier": 0}, ["'embedding_multiplier'"]),
    ("granitemoeshared", {"shared_intermediate_size": -2}, ["'shared_intermediate_size'"]),
    ("qwen2_moe", {"num_attention_heads": 4}, ["'num_key_value_heads' exceeds", "16 > 4"]),  # transformers' 16
    ("phimoe", {"num_experts_per_tok": 3}, ["'num_experts_per_tok'", "sparsemixer", "given: 3"]),
    ("phimoe", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, ["'rope_scaling.rope_type'", "yarn"]),
    ("phimoe", {"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 5, "long_factor": [2.0] * 5,
                                 "original_max_position_embeddings": 16, "long_mscale": 1.2}},
     ["'rope_scaling.short_mscale' is missing"]),
    ("phimoe", {"router_jitter_noise": 2.0}, ["'router_jitter_noise'", "given: 2"]),
    ("gpt_oss", {"layer_types": ["full_attention"]}, ["'layer_types'", "3 entries"]),
    ("gpt_oss", {"sliding_window": None}, ["sliding_attention", "'sliding_window' is null"]),
    ("gpt_oss", {"swiglu_limit": 0}, ["'swiglu_limit'", "given: 0"]),
    ("gpt_oss", {"swiglu_alpha": "fast"}, ["'swiglu_alpha'"]),
    ("gpt_oss", {"rope_scaling": {"rope_type": "yarn", "factor": 32.0, "truncate": 0}}, ["'rope_scaling.truncate'"]),
    ("gpt_oss", {"num_attention_heads": 4}, ["'num_key_value_heads' exceeds", "8 > 4"]),  # GptOssConfig's 8
]


@pytest.mark.parametrize(("model_type", "changes", "fragments"), REFUSED,
                         ids=[f"{m}-{'-'.join(c)}" for m, c, _ in REFUSED])
def test_unsupported_variants_are_one_line_naming_the_field(model_type: str, changes: dict[str, Any],
                                                           fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        registry.find(_raw(model_type, **changes)).config_from_hf(_raw(model_type, **changes))
    text = str(info.value)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text, text


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = tiny_config(model_type="qwen2_moe", num_hidden_layers=3, shared_expert_intermediate_size=16,
                      shared_expert_gate=True, hidden_size=72, head_dim=18, intermediate_size=24)
    return write_tiny(tmp_path_factory.mktemp("qwen2-src"), cfg, seed=1)


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"rope_scaling": {"type": "dynamic", "factor": 4.0}}, "'rope_scaling.type'"),
    ({"hidden_act": "gelu"}, "'hidden_act'"),
    ({"layer_types": ["full_attention", "full_attention"]}, "'layer_types'"),
    ({"mlp_only_layers": [7]}, "'mlp_only_layers'"),
    ({"decoder_sparse_step": 0}, "'decoder_sparse_step'"),
    ({"mlp_only_layers": [0, 1, 2]}, "'decoder_sparse_step'"),
])
def test_export_of_an_unsupported_variant_is_one_line_and_leaves_nothing(qwen2_dir: Path, tmp_path: Path,
                                                                         changes: dict[str, Any],
                                                                         fragment: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for f in qwen2_dir.iterdir():
        if f.name != "config.json":
            (src / f.name).symlink_to(f)
    raw = {**json.loads((qwen2_dir / "config.json").read_text()), **changes}
    (src / "config.json").write_text(json.dumps(raw))
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    one_line_error(invoke("export", src, "-o", out), fragment)
    assert list(out.parent.iterdir()) == []


def test_the_released_gpt_oss_config_reads_as_transformers_builds_it() -> None:
    """gpt-oss-20b's config.json (hub keys, its MXFP4 quantization_config and YaRN rope_scaling): the
    alternating windows, the biases, sinks and clamped SwiGLU, and the rope transformers computes."""
    raw = {"architectures": ["GptOssForCausalLM"], "attention_bias": True, "eos_token_id": 200002,
           "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
           "initial_context_length": 4096, "intermediate_size": 2880, "model_type": "gpt_oss",
           "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
           "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
           "num_local_experts": 32, "pad_token_id": 199999, "rms_norm_eps": 1e-05, "rope_theta": 150000,
           "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]},
           "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "rope_type": "yarn",
                            "original_max_position_embeddings": 4096, "truncate": False},
           "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False, "vocab_size": 201088}
    adapter = registry.find(raw)
    cfg = adapter.config_from_hf(raw)
    assert cfg.sliding_layers == tuple(range(0, 24, 2)) and cfg.sliding_window == 128
    assert (cfg.attention_sinks, cfg.router_bias, cfg.expert_bias, cfg.qkv_bias, cfg.o_bias) == (True,) * 5
    assert (cfg.expert_activation, cfg.swiglu_alpha, cfg.swiglu_limit) == ("swiglu_clamped", 1.702, 7.0)
    assert (cfg.routing_order, cfg.normalization, cfg.rope_type, cfg.rope_truncate) == \
        ("topk_softmax", "none", "yarn", False)
    hc, model = _transformers_model(adapter, raw)
    with torch.device("cpu"):
        hf_rope = type(model.model.rotary_emb)(hc)
    assert torch.allclose(hf_rope.inv_freq, torch.from_numpy(rope.inv_freq(cfg)), rtol=1e-6, atol=0)
    assert hf_rope.attention_scaling == pytest.approx(rope.attention_factor(cfg))
