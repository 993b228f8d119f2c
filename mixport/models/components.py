"""The shared reference modules the families compose: small modules, HF parameter names
(Mixtral's, which are mixport's state-dict names), KV cache as tensors.

Legend: B batch, S new tokens, P past tokens, T = B*S tokens, H hidden,
Q query heads, G kv heads, D head dim, E experts, k active, F intermediate, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as Fn
from torch import nn

from mixport.models.config import MoEConfig
from mixport.models.routing import topk_routing


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, D]; cos/sin [B, 1, S, D] -> rotated x (half-split convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # slices, not chunk: no ONNX sequence ops
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, G, L, D] -> [B, G*groups, L, D], each kv head serving ``groups`` query heads."""
    if groups == 1:
        return x
    b, g, n, d = x.shape
    return x[:, :, None].expand(b, g, groups, n, d).reshape(b, g * groups, n, d)


class Attention(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        q, g, d, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(h, q * d, bias=False)
        self.k_proj = nn.Linear(h, g * d, bias=False)
        self.v_proj = nn.Linear(h, g * d, bias=False)
        self.o_proj = nn.Linear(q * d, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                past_k: torch.Tensor, past_v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, s, _ = x.shape
        d = self.cfg.head_dim
        q = self.q_proj(x).view(b, s, -1, d).transpose(1, 2)  # [B, Q, S, D]
        k = self.k_proj(x).view(b, s, -1, d).transpose(1, 2)  # [B, G, S, D]
        v = self.v_proj(x).view(b, s, -1, d).transpose(1, 2)
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # [B, G, P+S, D]
        groups = self.cfg.kv_groups
        kk, vv = repeat_kv(k, groups), repeat_kv(v, groups)  # [B, Q, P+S, D]
        scores = (q @ kk.transpose(2, 3)).float() * d**-0.5 + bias  # [B, Q, S, P+S] fp32
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = (probs @ vv).transpose(1, 2).reshape(b, s, -1)  # [B, S, Q*D]
        return self.o_proj(out), k, v


class Expert(nn.Module):
    """One SwiGLU FFN, HF names: w1 gate, w3 up, w2 down."""

    def __init__(self, h: int, f: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(h, f, bias=False)
        self.w2 = nn.Linear(f, h, bias=False)
        self.w3 = nn.Linear(h, f, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(Fn.silu(self.w1(x)) * self.w3(x))


class Router(nn.Module):
    """gate -> softmax -> top-k -> (renormalize): the mixport TopKRouting node."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.k, self.normalization = cfg.num_experts_per_tok, cfg.normalization
        self.weight = nn.Parameter(torch.empty(cfg.num_local_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = Fn.linear(x, self.weight)  # [T, E]
        return topk_routing(logits, self.k, self.normalization)  # [T, k] x2

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> every expert's routing probability [T, E] fp32 (the tools' routing hooks)."""
        return torch.softmax(Fn.linear(x, self.weight).float(), dim=-1)


class Experts(nn.ModuleList):
    """The E expert FFNs, combined by the routing weights."""

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            return self._dense(x, weights, ids)
        out = torch.zeros_like(x)  # [T, H]; eager: only the selected experts run
        for e in ids.unique().tolist():
            token, slot = torch.where(ids == e)
            y = self[e](x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def _dense(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, scaled by its routing weight (0 when not picked):
        correct for any input; the fusion pass turns it into one sparse MoE node."""
        out = torch.zeros_like(x)
        for e, expert in enumerate(self):
            w_e = (weights * (ids == e).to(weights.dtype)).sum(-1, keepdim=True)  # [T, 1]
            out = out + expert(x) * w_e
        return out


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(Expert(cfg.hidden_size, cfg.intermediate_size)
                               for _ in range(cfg.num_local_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        flat = x.reshape(-1, h)  # [T, H]
        weights, ids = self.gate(flat)
        return self.experts(flat, weights, ids).reshape(b, s, h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.block_sparse_moe = SparseMoeBlock(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                past_k: torch.Tensor, past_v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, bias, past_k, past_v)
        x = x + a
        x = x + self.block_sparse_moe(self.post_attention_layernorm(x))
        return x, k, v


NEG = -1e9  # finite mask value: fully-masked (padding) rows stay NaN-free


def attention_bias(attention_mask: torch.Tensor, past_len: int, new_len: int,
                   window: int | None) -> torch.Tensor:
    """attention_mask [B, P+S] (1 keep, 0 pad) -> additive fp32 bias [B, 1, S, P+S]."""
    total = attention_mask.shape[1]
    q_idx = torch.arange(new_len, device=attention_mask.device) + past_len  # [S]
    kv_idx = torch.arange(total, device=attention_mask.device)  # [P+S]
    rel = q_idx[:, None] - kv_idx[None, :]  # [S, P+S]
    allowed = rel >= 0
    if window is not None:
        allowed = allowed & (rel < window)
    allowed = allowed[None, None] & (attention_mask[:, None, None, :] > 0)
    zero = torch.zeros((), dtype=torch.float32, device=attention_mask.device)
    return torch.where(allowed, zero, torch.full_like(zero, NEG))


def rope_inv_freq(cfg: MoEConfig) -> torch.Tensor:
    """[D/2] fp32 rotary frequencies for the config's theta (on the current default device)."""
    d = cfg.head_dim
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))


LayerFactory = Callable[[MoEConfig, int], nn.Module]  # (config, layer index) -> decoder layer


class DecoderModel(nn.Module):
    """Decoder stack + lm_head. forward(ids, mask, positions, past) -> logits, present.
    ``make_layer`` builds each decoder layer (the family adapter's ``decoder_layer``)."""

    def __init__(self, cfg: MoEConfig, make_layer: LayerFactory | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        make = make_layer or (lambda c, _i: DecoderLayer(c))
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(make(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, S, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, past: list[torch.Tensor]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """input_ids [B, S], attention_mask [B, P+S], position_ids [B, S],
        past = [k0, v0, k1, v1, ...] each [B, G, P, D] -> logits [B, S, V], present (same order)."""
        x = self.embed_tokens(input_ids)  # [B, S, H]
        cos, sin = self.rope(position_ids, x.dtype)
        bias = attention_bias(attention_mask, past[0].shape[2], input_ids.shape[1],
                              self.cfg.sliding_window)
        present: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, bias, past[2 * i], past[2 * i + 1])
            present += [k, v]
        return self.lm_head(self.norm(x)), present

    def computed_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers the checkpoint does not hold, computed on the CPU (also for a meta model)."""
        with torch.device("cpu"):
            return {"inv_freq": rope_inv_freq(self.cfg)}

    def empty_past(self, batch: int, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        cfg = self.cfg
        dtype = dtype or self.lm_head.weight.dtype
        shape = (batch, cfg.num_key_value_heads, 0, cfg.head_dim)
        return [torch.zeros(shape, dtype=dtype) for _ in range(2 * cfg.num_hidden_layers)]
