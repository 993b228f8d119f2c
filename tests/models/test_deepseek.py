"""DeepSeek-V2 / V3 config.json reading against transformers' own config and model classes.

For a minimal config.json (the keys mixport requires; transformers' defaults for the rest: 64 / 256
experts, LoRA ranks, 2 / 1 shared experts, first_k_dense_replace 0 / 3) and for each family's
switches, mixport's ``MoEConfig`` must describe the model transformers builds from the same file (both
on the meta device): every weight's name and shape through the adapter's renaming, the norms' epsilons
(q_a/kv_a layernorms at transformers' 1e-6), the softmax scale, the RoPE width and layout, which layers
are dense, the shared experts' width, the cache transformers' model keeps (past/present shapes). Routing
against transformers' router modules is in tests/models/test_deepseek_routing.py. Unsupported variants
are refused with one line naming the config.json key.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mixport.errors import ConfigError
from mixport.exporter.loader import expected_shapes
from mixport.models import registry, rope
from mixport.models.config import MoEConfig
from tests.helpers import require_module

transformers = require_module("transformers")

SIZES = {"vocab_size": 1000, "hidden_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_experts_per_tok": 3}
MINIMAL = {"deepseek_v2": SIZES, "deepseek_v3": SIZES}
SMALL = {"kv_lora_rank": 24, "qk_nope_head_dim": 12, "qk_rope_head_dim": 8, "v_head_dim": 10,
         "moe_intermediate_size": 20, "intermediate_size": 40}
SWITCHES: dict[str, list[dict[str, Any]]] = {
    "deepseek_v2": [
        {**SMALL, "q_lora_rank": None, "n_routed_experts": 8, "n_shared_experts": 3, "first_k_dense_replace": 1},
        {**SMALL, "q_lora_rank": 16, "attention_bias": True, "n_shared_experts": 0, "rms_norm_eps": 1e-3,
         "num_experts": 6, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
        {**SMALL, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "n_routed_experts": 8,
         "routed_scaling_factor": 1.5, "norm_topk_prob": True,  # which transformers' V2 ignores
         "rope_scaling": {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512, "mscale": 0.9,
                          "mscale_all_dim": 1.1, "beta_fast": 16, "beta_slow": 2}, "max_position_embeddings": 4096},
    ],
    "deepseek_v3": [
        {**SMALL, "q_lora_rank": 16, "rope_interleave": True, "first_k_dense_replace": 2, "n_routed_experts": 8,
         "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2},
        {**SMALL, "q_lora_rank": None, "rope_interleave": False, "first_k_dense_replace": 0,
         "num_local_experts": 6, "n_group": 1, "topk_group": 1, "tie_word_embeddings": True},
        {**SMALL, "n_routed_experts": 12, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 4,
         "norm_topk_prob": False, "routed_scaling_factor": 1.0,
         "rope_parameters": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                             "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 1e4}},
    ],
}
# The hub's config.json files (DeepSeek-V2-Lite; DeepSeek-V3 without its fp8 quantization_config), depth cut to 4
V2_LITE = {"aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
           "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 10944, "kv_lora_rank": 512,
           "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
           "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
           "num_experts_per_tok": 6, "num_hidden_layers": 4, "num_key_value_heads": 16, "q_lora_rank": None,
           "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
           "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                            "original_max_position_embeddings": 4096, "type": "yarn"},
           "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
           "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "v_head_dim": 128,
           "vocab_size": 102400}
V3 = {"bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
      "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
      "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
      "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
      "num_hidden_layers": 4, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
      "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
      "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                       "original_max_position_embeddings": 4096, "type": "yarn"},
      "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
      "topk_group": 4, "topk_method": "noaux_tc", "v_head_dim": 128, "vocab_size": 129280}
SWITCHES["deepseek_v2"].append(V2_LITE)
SWITCHES["deepseek_v3"].append(V3)
LAYOUTS = {"deepseek_v2": lambda hc: "pairs",
           "deepseek_v3": lambda hc: "pairs_to_half" if hc.rope_interleave else "half"}


def _raw(model_type: str, **changes: Any) -> dict[str, Any]:
    raw = {**MINIMAL[model_type], "architectures": [registry.get(model_type).name], "model_type": model_type}
    raw.update(changes)
    return raw


def _transformers(model_type: str, raw: dict[str, Any]) -> tuple[Any, Any]:
    cls = registry.get(model_type).transformers_class()
    hc = cls.config_class(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        return hc, cls(hc)


def _theirs(model_type: str, raw: dict[str, Any]) -> dict[str, Any]:
    adapter = registry.get(model_type)
    hc, model = _transformers(model_type, raw)
    weights = {name: shape for hf_name, t in model.state_dict().items()
               for name, shape, _ in adapter.checkpoint_names(hf_name, tuple(t.shape))
               if 0 not in shape}  # n_shared_experts 0: transformers' shared MLP of width 0 adds 0
    if hc.tie_word_embeddings:  # the reference keeps an lm_head of its own (loaded from the embeddings)
        weights.setdefault("lm_head.weight", weights["embed_tokens.weight"])
    layers = model.model.layers
    kinds = ["moe" if hasattr(layer.mlp, "experts") else "dense" for layer in layers]
    shared = {layer.mlp.shared_experts.intermediate_size for layer in layers if hasattr(layer.mlp, "experts")}
    return {"weights": weights, "eps": sorted(m.variance_epsilon for m in model.modules()
                                              if hasattr(m, "variance_epsilon")),
            "scale": {layer.self_attn.scaling for layer in layers}, "rope": (hc.head_dim, LAYOUTS[model_type](hc)),
            "theta": float(hc.rope_parameters["rope_theta"]), "kinds": kinds, "shared": shared,
            "tokens": (hc.bos_token_id, hc.eos_token_id, hc.pad_token_id), "positions": hc.max_position_embeddings,
            "experts": hc.n_routed_experts, "k": hc.num_experts_per_tok, "tie": hc.tie_word_embeddings}


def _ours(model_type: str, cfg: MoEConfig) -> dict[str, Any]:
    adapter = registry.get(model_type)
    with torch.device("meta"):
        ref = adapter.reference_model(cfg)
    kinds = ["moe" if cfg.is_sparse(i) else "dense" for i in range(cfg.num_hidden_layers)]
    return {"weights": {n: tuple(s) for n, s in expected_shapes(cfg).items()},
            "eps": sorted(m.eps for m in ref.modules() if type(m).__name__ == "RMSNorm"),
            "scale": {layer.self_attn.scale for layer in ref.layers}, "rope": (cfg.head_dim, cfg.rope_layout),
            "theta": cfg.rope_theta, "kinds": kinds,
            "shared": {cfg.shared_expert_intermediate_size} if adapter.moe_layers(cfg) else set(),
            "tokens": (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id),
            "positions": cfg.max_position_embeddings, "experts": cfg.num_local_experts, "k": cfg.num_experts_per_tok,
            "tie": cfg.tie_word_embeddings}


def _rope(model_type: str, hc: Any, model: Any) -> tuple[list[float], float]:
    """transformers' rotary frequencies and cos/sin factor (its rotary class rebuilt off the meta device)."""
    rotary = type(model.model.rotary_emb)(hc)
    return rotary.inv_freq.tolist(), float(rotary.attention_scaling)


def _routing(model_type: str, hc: Any, model: Any, cfg: MoEConfig) -> None:
    """transformers' router module (a CPU copy; random weight and correction bias) and mixport's Router
    built from ``cfg`` pick the same experts with the same weights."""
    from mixport.models.components import Router

    router = next(m for m in model.modules() if "TopkRouter" in type(m).__name__)
    gen = torch.Generator().manual_seed(0)
    with torch.device("cpu"):
        theirs, ours = type(router)(hc), Router(cfg)
    x = torch.randn(256, cfg.hidden_size, generator=gen)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(theirs.weight.shape, generator=gen))
        ours.weight.copy_(theirs.weight)
        if cfg.selection_bias:
            theirs.e_score_correction_bias.copy_(torch.randn(cfg.num_local_experts, generator=gen))
            ours.e_score_correction_bias.copy_(theirs.e_score_correction_bias)
        _, want_w, want_ids = theirs(x)
        got_w, got_ids = ours(x)
    order = want_ids.argsort(dim=-1)  # transformers' topk is unsorted
    want_ids, want_w = want_ids.gather(1, order), want_w.gather(1, order)
    order = got_ids.argsort(dim=-1)
    assert torch.equal(want_ids, got_ids.gather(1, order)), "routing picks other experts"
    assert (want_w - got_w.gather(1, order)).abs().max() <= 1e-6, "routing weighs the experts otherwise"


def _cases() -> list[Any]:
    out = [pytest.param(mt, {}, id=f"{mt}-minimal") for mt in MINIMAL]
    return out + [pytest.param(mt, sw, id=f"{mt}-switches{i}") for mt, sws in SWITCHES.items()
                  for i, sw in enumerate(sws)]


@pytest.mark.parametrize(("model_type", "changes"), _cases())
def test_config_describes_the_model_transformers_builds(model_type: str, changes: dict[str, Any]) -> None:
    raw = _raw(model_type, **changes)
    cfg = registry.get(model_type).config_from_hf(raw)
    assert cfg.mla and cfg.model_type == model_type
    theirs, ours = _theirs(model_type, raw), _ours(model_type, cfg)
    assert theirs.pop("weights") == ours.pop("weights")
    assert theirs == ours
    hc, model = _transformers(model_type, raw)
    freqs, factor = _rope(model_type, hc, model)
    assert rope.inv_freq(cfg).tolist() == pytest.approx(freqs, rel=1e-6) and rope.attention_factor(cfg) == factor
    _routing(model_type, hc, model, cfg)


def test_the_cache_is_what_transformers_caches() -> None:
    """past/present per layer: transformers' DynamicCache keys (the normed latent) and values (the roped
    key), so the export's cache is transformers' own (models/test_mla.py compares their contents)."""
    raw = _raw("deepseek_v2", **SWITCHES["deepseek_v2"][0])
    cfg = registry.get("deepseek_v2").config_from_hf(raw)
    hc, _ = _transformers("deepseek_v2", raw)
    hc.num_hidden_layers = 1
    torch.manual_seed(0)
    model = registry.get("deepseek_v2").transformers_class()(hc).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    layer = (getattr(out, "cache", None) or out.past_key_values).layers[0]
    (kh, kw), (vh, vw) = cfg.cache_dims()
    assert tuple(layer.keys.shape) == (1, kh, 3, kw) == (1, 1, 3, cfg.kv_lora_rank)
    assert tuple(layer.values.shape) == (1, vh, 3, vw) == (1, 1, 3, cfg.head_dim)


def test_multi_token_prediction_layers_are_not_read() -> None:
    adapter = registry.get("deepseek_v3")
    cfg = adapter.config_from_hf(_raw("deepseek_v3", **SWITCHES["deepseek_v3"][0]))
    assert adapter.ignorable("layers.4.mlp.experts.0.gate_proj.weight", (20, 96), cfg)  # layer 4 of 4: MTP
    assert adapter.ignorable("layers.4.eh_proj.weight", (96, 192), cfg)
    assert not adapter.ignorable("layers.3.mlp.experts.0.gate_proj.weight", (20, 96), cfg)
    assert not registry.get("deepseek_v2").ignorable("layers.4.eh_proj.weight", (96, 192), cfg)


REFUSED = [  # (model_type, changes, fragments of the one line)
    ("deepseek_v2", {"mlp_bias": True}, ["'mlp_bias'"]),
    ("deepseek_v2", {"moe_layer_freq": 2}, ["'moe_layer_freq'", "given: 2"]),
    ("deepseek_v2", {"topk_method": "noaux_tc"}, ["'topk_method'", '"noaux_tc"', "group_limited_greedy"]),
    ("deepseek_v2", {"hidden_size": 90}, ["'hidden_size'", "'num_attention_heads'"]),
    ("deepseek_v2", {"num_key_value_heads": 2}, ["'num_key_value_heads'", "must equal"]),
    ("deepseek_v2", {"kv_lora_rank": 0}, ["'kv_lora_rank'", "given: 0"]),
    ("deepseek_v2", {"q_lora_rank": 0}, ["'q_lora_rank'", "given: 0"]),
    ("deepseek_v2", {"v_head_dim": None}, ["'v_head_dim'", "null"]),
    ("deepseek_v2", {"qk_rope_head_dim": 7}, ["'qk_rope_head_dim'", "even"]),
    ("deepseek_v2", {"n_shared_experts": -1}, ["'n_shared_experts'"]),
    ("deepseek_v2", {"first_k_dense_replace": 4}, ["no layer with experts"]),
    ("deepseek_v2", {"sliding_window": 64}, ["'sliding_window'"]),
    ("deepseek_v2", {"hidden_act": "gelu"}, ["'hidden_act'"]),
    ("deepseek_v3", {"quantization_config": {"quant_method": "fp8"}}, ["'quantization_config'", '"fp8"', "bf16"]),
    ("deepseek_v3", {"rope_interleave": "yes"}, ["'rope_interleave'", "true or false"]),
    ("deepseek_v3", {"moe_intermediate_size": 0}, ["'moe_intermediate_size'"]),
]


@pytest.mark.parametrize(("model_type", "changes", "fragments"), REFUSED,
                         ids=[f"{m}-{'-'.join(c)}" for m, c, _ in REFUSED])
def test_unsupported_variants_are_one_line_naming_the_field(model_type: str, changes: dict[str, Any],
                                                           fragments: list[str]) -> None:
    raw = _raw(model_type, **changes)
    with pytest.raises(ConfigError) as info:
        registry.find(raw).config_from_hf(raw)
    text = str(info.value)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text, text


def _own_keys() -> list[Any]:
    from tests.models.test_families import own_keys

    keys = own_keys([registry.get(mt) for mt in MINIMAL])
    return [pytest.param(m, f, k, id=f"{m}-{k}") for m, f, k in keys]


@pytest.mark.parametrize(("model_type", "field", "key"), _own_keys())
def test_a_familys_own_key_of_the_wrong_type_is_one_line_naming_it(model_type: str, field: str, key: str) -> None:
    from mixport.config_fields import FIELDS

    for value in ("1", -1, [1]):  # a string, out of range (or a wrong sign), a list
        if FIELDS[field].accepts(value):
            continue
        with pytest.raises(ConfigError) as info:
            registry.get(model_type).config_from_hf(_raw(model_type, **{key: value}))
        assert "\n" not in str(info.value) and f"'{key}'" in str(info.value), str(info.value)
