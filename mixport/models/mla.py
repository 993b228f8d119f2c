"""Multi-head latent attention (MLA, DeepSeek-V2/V3), as transformers' DeepSeek modeling files compute it.

Keys and values come from one compressed kv per token: ``kv_a_proj_with_mqa`` makes a latent
[kv_lora_rank] (RMS-normed by ``kv_a_layernorm``) and a roped key part [r] every head shares;
``kv_b_proj`` expands the latent to each head's key part without RoPE [n] and its value [v]. Queries:
``q_proj``, or ``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj`` when ``q_lora_rank`` is set; RoPE turns
only their last r dims. The KV cache holds what transformers' caches hold: the normed latent as the
"key" [B, 1, P, kv_lora_rank] and the roped shared key as the "value" [B, 1, P, r], so k and v have
different shapes (``MoEConfig.cache_dims``). Attention runs in the latent space ("absorbed" MLA): each
head's q_nope goes through its rows of kv_b_proj's key part [n, R] and meets the cached latents directly,
the probabilities weigh the latents, and the result goes through the head's value rows [v, R]. It is
transformers' expand-then-attend reassociated (equal within fp32 rounding), and a decode step costs
O(P * (R + r)) per head instead of expanding all P cached latents through kv_b_proj (O(P * R * N * (n + v))).
Softmax scale: (n + r) ** -0.5, times YaRN's mscale(factor, mscale_all_dim) ** 2 when configured.

Legend: B batch, S new tokens, P past tokens, L = P + S, H hidden, N heads, n q/k head width without
RoPE, r RoPE width (cfg.head_dim), v value head width, R kv_lora_rank.
"""

from __future__ import annotations

import torch
from torch import nn

from mixport.models.components import RMSNorm, rotary
from mixport.models.config import MoEConfig
from mixport.models.rope import yarn_mscale

LORA_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: transformers builds them with its RMSNorm's default eps


def softmax_scale(cfg: MoEConfig) -> float:
    """(n + r) ** -0.5, times mscale(factor, mscale_all_dim) twice under YaRN with mscale_all_dim (transformers'
    yarn_apply_mscale, in its order of operations; rope.mscale_scale is the same factor)."""
    scale = (cfg.qk_nope_head_dim + cfg.head_dim) ** -0.5
    if cfg.rope_type != "default" and cfg.rope_mscale_all_dim:
        factor = cfg.rope_factor or cfg.max_position_embeddings / float(cfg.rope_original_max or 1)
        m = yarn_mscale(float(factor), cfg.rope_mscale_all_dim)
        scale = scale * m * m
    return scale


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """x [B, heads, S, r] rotated by cos/sin [B, 1, S, r] (each cat(freqs, freqs)), in ``layout``:
    "half" rotate_half; "pairs" rotates (x0, x1), (x2, x3)... each by one frequency and keeps them
    interleaved (DeepSeek-V2's complex product); "pairs_to_half" rotates the same pairs and writes the
    rotated evens, then the rotated odds (DeepSeek-V3's rope_interleave)."""
    if layout == "half":
        return rotary(x, cos, sin)
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]  # [B, 1, S, r/2]: one angle per pair
    x1, x2 = x[..., 0::2], x[..., 1::2]
    r1, r2 = x1 * c - x2 * s, x2 * c + x1 * s
    if layout == "pairs_to_half":
        return torch.cat((r1, r2), dim=-1)
    return torch.stack((r1, r2), dim=-1).flatten(-2)  # (r1[0], r2[0], r1[1], ...)


class MLAttention(nn.Module):
    """DeepseekV2Attention / DeepseekV3Attention (eager), parameter names as theirs."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, heads, rank = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
        nope, rope, v = cfg.qk_nope_head_dim, cfg.head_dim, cfg.v_head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LORA_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, heads * (nope + rope), bias=False)
        else:
            self.q_proj = nn.Linear(h, heads * (nope + rope), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, rank + rope, bias=cfg.qkv_bias)
        self.kv_a_layernorm = RMSNorm(rank, LORA_EPS)
        self.kv_b_proj = nn.Linear(rank, heads * (nope + v), bias=False)
        self.o_proj = nn.Linear(heads * v, h, bias=cfg.o_bias)
        self.scale = softmax_scale(cfg)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, H] -> q [B, N, S, n + r]."""
        b, s, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.cfg.q_lora_rank else self.q_proj(x)
        return q.view(b, s, self.cfg.num_attention_heads, -1).transpose(1, 2)

    def _absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's weight [N*(n+v), R] per head: its key rows [N, n, R] and value rows [N, v, R]."""
        cfg = self.cfg
        w = self.kv_b_proj.weight.view(cfg.num_attention_heads, -1, cfg.kv_lora_rank)
        return w[:, :cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                past_k: torch.Tensor, past_v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B, S, H]; past_k [B, 1, P, R] (normed latents), past_v [B, 1, P, r] (roped keys) ->
        output [B, S, H] and the cache with this step appended (L = P + S)."""
        cfg = self.cfg
        b, s, _ = x.shape
        q = self._query(x)  # [B, N, S, n + r]
        q_nope, q_rot = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
        compressed = self.kv_a_proj_with_mqa(x)  # [B, S, R + r]
        latent = self.kv_a_layernorm(compressed[..., :cfg.kv_lora_rank])[:, None]  # [B, 1, S, R]
        k_rot = compressed[..., cfg.kv_lora_rank:][:, None]  # [B, 1, S, r]
        q_rot, k_rot = rotate(q_rot, cos, sin, cfg.rope_layout), rotate(k_rot, cos, sin, cfg.rope_layout)
        latent, k_rot = torch.cat([past_k, latent], dim=2), torch.cat([past_v, k_rot], dim=2)  # [B, 1, L, .]
        w_k, w_v = self._absorbed()  # [N, n, R], [N, v, R]
        scores = (q_nope @ w_k) @ latent.transpose(2, 3) + q_rot @ k_rot.transpose(2, 3)  # [B, N, S, L]
        probs = torch.softmax(scores.float() * self.scale + bias, dim=-1).to(q.dtype)  # fp32 softmax
        out = ((probs @ latent) @ w_v.transpose(1, 2)).transpose(1, 2).reshape(b, s, -1)  # [B, S, N*v]
        return self.o_proj(out), latent, k_rot
