"""MLA (models/mla.py) against transformers' own DeepSeek attention modules, layer by layer.

Each variant (V2's interleaved RoPE kept interleaved, V3's rope_interleave and rotate_half, a plain
q_proj and a q LoRA, attention biases) runs a prefill and two decode steps with a left-padded batch
through transformers' DeepseekV2Attention / DeepseekV3Attention (eager, its DynamicCache) and through
MLAttention (mixport's tensors as cache): outputs and the cache tensors themselves must agree, so the
export's past/present are transformers' cache, shapes and layout included.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from mixport.models import registry
from mixport.models.components import attention_bias, rope_inv_freq
from mixport.models.config import MoEConfig
from mixport.models.mla import MLAttention
from tests.conftest import tiny_config
from tests.helpers import require_module

transformers = require_module("transformers")

MLA = dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=3, head_dim=8, kv_lora_rank=20,
           qk_nope_head_dim=12, v_head_dim=10, rope_theta=500.0)
VARIANTS = {
    "v2-q_proj": dict(model_type="deepseek_v2", rope_layout="pairs"),
    "v2-q_lora-bias": dict(model_type="deepseek_v2", rope_layout="pairs", q_lora_rank=16, qkv_bias=True, o_bias=True),
    "v3-interleave-q_lora": dict(model_type="deepseek_v3", rope_layout="pairs_to_half", q_lora_rank=16),
    "v3-half": dict(model_type="deepseek_v3", rope_layout="half"),
}


def _pair(cfg: MoEConfig) -> tuple[Any, MLAttention, Any]:
    """(transformers' attention, ours with the same weights, transformers' rotary embedding)."""
    adapter = registry.for_config(cfg)
    module = __import__(f"transformers.models.{cfg.model_type}.modeling_{cfg.model_type}", fromlist=["x"])
    prefix = "DeepseekV2" if cfg.model_type == "deepseek_v2" else "DeepseekV3"
    hc = adapter.transformers_class().config_class(**adapter.to_hf_dict(cfg))
    hc._attn_implementation = "eager"
    theirs = getattr(module, f"{prefix}Attention")(hc, layer_idx=0).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim == 2 else 1.0) + (p.ndim == 1))
    ours = MLAttention(cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours, getattr(module, f"{prefix}RotaryEmbedding")(hc), hc


def _cos_sin(cfg: MoEConfig, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = pos[..., None].float() * rope_inv_freq(cfg)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("variant", VARIANTS)
def test_mla_matches_transformers_attention_and_cache(variant: str) -> None:
    from transformers import DynamicCache

    cfg = replace(tiny_config(**MLA), **VARIANTS[variant])
    theirs, ours, rotary, hc = _pair(cfg)
    assert ours.scale == theirs.scaling
    gen = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    cache, past = DynamicCache(config=hc), [torch.zeros(2, h, 0, w) for h, w in cfg.cache_dims()]
    done = 0
    for new in (5, 1, 1):  # prefill, two decode steps
        x = torch.randn(2, new, cfg.hidden_size, generator=gen)
        m = mask[:, :done + new]
        pos = (torch.cumsum(m, 1) - 1).clamp(min=0)[:, done:]
        bias = attention_bias(m, done, new, None)
        with torch.no_grad():
            want, _ = theirs(x, attention_mask=bias, cache=cache, position_embeddings=rotary(x, pos))
            got, *past = ours(x, *_cos_sin(cfg, pos), bias, *past)
        rows = m[:, done:].bool()  # a padded query row attends to nothing real: not compared
        assert (got - want)[rows].abs().max() <= 1e-5, variant
        layer = cache.layers[0]
        assert past[0].shape == (2, 1, done + new, cfg.kv_lora_rank) and past[1].shape == (2, 1, done + new, 8)
        assert torch.allclose(past[0], layer.keys, atol=1e-6) and torch.allclose(past[1], layer.values, atol=1e-6)
        done += new
