"""The shared reference modules the families compose: small modules, HF parameter names
(Mixtral's, which are mixport's state-dict names), KV cache as tensors.

Legend: B batch, S new tokens, P past tokens, T = B*S tokens, H hidden,
Q query heads, G kv heads, D head dim, E experts, k active, F intermediate, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as Fn
from torch import nn

from mixport.models import rope
from mixport.models.config import MoEConfig
from mixport.models.routing import group_mask, group_scores, topk_routing


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(cfg: MoEConfig, dim: int) -> nn.Module:
    """The decoder's norm: RMSNorm, or LayerNorm with weight and bias (``cfg.norm_type`` "layer",
    PhiMoE), eps ``cfg.rms_norm_eps`` either way."""
    if cfg.norm_type == "layer":
        return nn.LayerNorm(dim, eps=cfg.rms_norm_eps)
    return RMSNorm(dim, cfg.rms_norm_eps)


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


@dataclass(frozen=True)
class Layout:
    """Where a family's decoder layer keeps its modules: the attribute names that become mixport's
    state-dict (and ONNX initializer) names. Defaults: Mixtral's."""

    moe: str = "block_sparse_moe"  # the MoE block, in the decoder layer
    router: str = "gate"  # in the MoE block
    experts: str = "experts"  # in the MoE block
    projections: tuple[str, str, str] = ("w1", "w3", "w2")  # an expert's gate, up, down
    shared: str = "shared_expert"  # the shared expert, in the MoE block
    shared_gate: str = "shared_expert_gate"  # its sigmoid gate, in the MoE block
    dense: str = "mlp"  # a dense layer's MLP, in the decoder layer
    mlp_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # shared / dense MLP roles


class Attention(nn.Module):
    """Grouped-query attention with RoPE; optional q/k/v bias, q/k RMSNorm (per head or over the
    projection), q/k/v clipping and a configured softmax scale."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        q, g, d, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(h, q * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, g * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, g * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q * d, h, bias=cfg.o_bias)
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = RMSNorm(d if per_head else q * d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d if per_head else g * d, cfg.rms_norm_eps)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B, S, H] -> q [B, S, Q, D], k and v [B, S, G, D], normed and clipped as configured."""
        b, s, _ = x.shape
        cfg, d = self.cfg, self.cfg.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if cfg.qk_norm == "projection":  # over the whole projection width (OLMoE)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(b, s, -1, d) for t in (q, k, v))
        if cfg.qk_norm == "head":  # over each head's D (Qwen3)
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        return q, k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                past_k: torch.Tensor, past_v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, s, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self._heads(x))  # [B, Q, S, D], [B, G, S, D] x2
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # [B, G, P+S, D]
        groups = self.cfg.kv_groups
        kk, vv = repeat_kv(k, groups), repeat_kv(v, groups)  # [B, Q, P+S, D]
        scores = (q @ kk.transpose(2, 3)).float() * self.cfg.scale + bias  # [B, Q, S, P+S] fp32
        probs = self.probabilities(scores).to(q.dtype)
        out = (probs @ vv).transpose(1, 2).reshape(b, s, -1)  # [B, S, Q*D]
        return self.o_proj(out), k, v

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """fp32 attention scores [B, Q, S, P+S] -> the weights of the values (a softmax)."""
        return torch.softmax(scores, dim=-1)


class GatedMLP(nn.Module):
    """One SwiGLU FFN: down(silu(gate(x)) * up(x)); ``names`` (gate, up, down) are its Linear
    modules' attribute names (Mixtral's experts: w1, w3, w2; Qwen's: gate_proj, up_proj, down_proj)."""

    def __init__(self, h: int, f: int, names: tuple[str, str, str] = ("w1", "w3", "w2")) -> None:
        super().__init__()
        self.names = names
        gate, up, down = names
        self.add_module(gate, nn.Linear(h, f, bias=False))
        self.add_module(up, nn.Linear(h, f, bias=False))
        self.add_module(down, nn.Linear(f, h, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(Fn.silu(gate(x)) * up(x))


class Router(nn.Module):
    """gate -> softmax -> top-k -> (renormalize), or top-k of the logits -> softmax over the k, or the
    config's other routing (``cfg.routing()``: sigmoid, selection bias, groups, sparsemixer, scaling):
    the mixport TopKRouting node."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.k, self.normalization, self.order = cfg.num_experts_per_tok, cfg.normalization, cfg.routing_order
        self.spec = cfg.routing()
        self.weight = nn.Parameter(torch.empty(cfg.num_local_experts, cfg.hidden_size))
        if cfg.selection_bias:  # DeepSeek-V3's name; fp32 whatever the model's dtype
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_local_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.route(Fn.linear(x, self.weight))  # [T, k] x2

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits [T, E] -> weights [T, k], ids [T, k] (the TopKRouting op)."""
        s = self.spec
        if s.plain:
            return topk_routing(logits, self.k, self.normalization, self.order)
        return topk_routing(logits, s.k, s.normalization, s.order, getattr(self, "e_score_correction_bias", None),
                            s.scoring, s.n_group, s.topk_group, s.group_score, s.scaling, s.eps)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> the router logits [T, E] fp32 (the tools' routing hooks; ``selected`` turns
        them into the experts picked)."""
        return Fn.linear(x, self.weight).float()

    def selected(self, logits: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E] (this router's, or transformers' for it) -> the experts picked [T, k]:
        the top-k of the logits only without a selection bias or groups."""
        return self.route(logits.float())[1]

    def choice(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the experts are picked by, for the tools' tie counts: (scores [T, E] whose top-k are the
        picks, the group scores [T, G] whose top topk_group are kept, or None). The logits themselves
        for softmax / sparsemixer routing without bias or groups (picks = top-k of the logits)."""
        s, x = self.spec, logits.float()
        if s.scoring == "sparsemixer" or (s.scoring == "softmax" and not s.bias and s.n_group == 1):
            return x, None
        scores = torch.sigmoid(x) if s.scoring == "sigmoid" else torch.softmax(x, dim=-1)
        if s.bias:
            scores = scores + self.e_score_correction_bias.float()
        if s.n_group == 1:
            return scores, None
        return group_mask(scores, s.n_group, s.topk_group, s.group_score), group_scores(scores, s.n_group,
                                                                                      s.group_score)


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
    """Router + routed experts (+ an optional shared expert on every token, optionally scaled by
    sigmoid(x @ gate)); attribute names from ``layout``."""

    def __init__(self, cfg: MoEConfig, layout: Layout = Layout()) -> None:
        super().__init__()
        self.layout = layout
        self.add_module(layout.router, Router(cfg))
        self.add_module(layout.experts, Experts(GatedMLP(cfg.hidden_size, cfg.intermediate_size, layout.projections)
                                                for _ in range(cfg.num_local_experts)))
        if cfg.shared_expert_intermediate_size:
            self.add_module(layout.shared, GatedMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size,
                                                    layout.mlp_projections))
            if cfg.shared_expert_gate:
                self.add_module(layout.shared_gate, nn.Linear(cfg.hidden_size, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        flat = x.reshape(-1, h)  # [T, H]
        weights, ids = getattr(self, self.layout.router)(flat)
        out = getattr(self, self.layout.experts)(flat, weights, ids)
        shared = getattr(self, self.layout.shared, None)
        if shared is not None:
            gate = getattr(self, self.layout.shared_gate, None)
            y = shared(flat)
            out = out + (y if gate is None else torch.sigmoid(gate(flat)) * y)
        return out.reshape(b, s, h)


class DecoderLayer(nn.Module):
    """Pre-norm attention + feed-forward (sparse MoE, or a dense MLP in ``cfg.dense_layers``)."""

    def __init__(self, cfg: MoEConfig, index: int = 0, layout: Layout = Layout()) -> None:
        super().__init__()
        self.residual_multiplier = cfg.residual_multiplier
        self.input_layernorm = make_norm(cfg, cfg.hidden_size)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg, cfg.hidden_size)
        if cfg.is_sparse(index):
            self.ffn_name = layout.moe
            self.add_module(layout.moe, SparseMoeBlock(cfg, layout))
        else:
            self.ffn_name = layout.dense
            self.add_module(layout.dense, GatedMLP(cfg.hidden_size, cfg.dense_intermediate_size,
                                                   layout.mlp_projections))

    def _residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + (y if self.residual_multiplier == 1.0 else y * self.residual_multiplier)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                past_k: torch.Tensor, past_v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, bias, past_k, past_v)
        x = self._residual(x, a)
        x = self._residual(x, getattr(self, self.ffn_name)(self.post_attention_layernorm(x)))
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


def rope_inv_freq(cfg: MoEConfig, dim: int | None = None) -> torch.Tensor:
    """[dim/2] fp32 rotary frequencies of the config's rope (plain, YaRN, LongRoPE's short factors;
    mixport.models.rope), on the current default device."""
    return torch.from_numpy(rope.inv_freq(cfg, dim)).to(torch.get_default_device())


def rope_buffers(cfg: MoEConfig, dim: int | None = None) -> dict[str, torch.Tensor]:
    """The rotary buffers a model computes rather than loads (on the current default device):
    ``inv_freq``, and LongRoPE's ``long_inv_freq``."""
    out = {"inv_freq": rope_inv_freq(cfg, dim)}
    long = rope.long_inv_freq(cfg, dim)
    if long is not None:
        out["long_inv_freq"] = torch.from_numpy(long).to(torch.get_default_device())
    return out


def rope_tables(cfg: MoEConfig, inv_freq: torch.Tensor, position_ids: torch.Tensor,
                long_inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [B, S] -> fp32 cos, sin [B, S, dim] (half-split layout), times the rope's attention
    factor; LongRoPE takes ``long_inv_freq`` for the whole call when max(position_ids) + 1 exceeds the
    original context (transformers' dynamic_rope_update)."""
    freq = inv_freq
    if long_inv_freq is not None:
        beyond = position_ids.max() + 1 > cfg.rope_original_max
        freq = torch.where(beyond, long_inv_freq, inv_freq)
    freqs = position_ids[..., None].float() * freq  # [B, S, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    factor = rope.attention_factor(cfg)
    cos, sin = emb.cos(), emb.sin()
    return (cos, sin) if factor == 1.0 else (cos * factor, sin * factor)


LayerFactory = Callable[[MoEConfig, int], nn.Module]  # (config, layer index) -> decoder layer


class DecoderModel(nn.Module):
    """Decoder stack + lm_head. forward(ids, mask, positions, past) -> logits, present.
    ``make_layer`` builds each decoder layer (the family adapter's ``decoder_layer``)."""

    def __init__(self, cfg: MoEConfig, make_layer: LayerFactory | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        make = make_layer or (lambda c, i: DecoderLayer(c, i))
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(make(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        for name, value in rope_buffers(cfg).items():
            self.register_buffer(name, value, persistent=False)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] -> cos, sin [B, 1, S, D] in ``dtype`` (mixport.models.rope)."""
        cos, sin = rope_tables(self.cfg, self.inv_freq, position_ids, getattr(self, "long_inv_freq", None))
        return cos[:, None].to(dtype), sin[:, None].to(dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, past: list[torch.Tensor]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """input_ids [B, S], attention_mask [B, P+S], position_ids [B, S],
        past = [k0, v0, k1, v1, ...] each [B, G, P, D] -> logits [B, S, V], present (same order)."""
        cfg = self.cfg
        x = self.embed_tokens(input_ids)  # [B, S, H]
        if cfg.embedding_multiplier != 1.0:
            x = x * cfg.embedding_multiplier
        cos, sin = self.rope(position_ids, x.dtype)
        biases = {w: attention_bias(attention_mask, past[0].shape[2], input_ids.shape[1], w)
                  for w in {cfg.window(i) for i in range(cfg.num_hidden_layers)}}  # one per window
        present: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, biases[cfg.window(i)], past[2 * i], past[2 * i + 1])
            present += [k, v]
        logits = self.lm_head(self.norm(x))
        return (logits if cfg.logits_scaling == 1.0 else logits / cfg.logits_scaling), present

    def computed_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers the checkpoint does not hold, computed on the CPU (also for a meta model)."""
        with torch.device("cpu"):
            return rope_buffers(self.cfg)

    def empty_past(self, batch: int, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        cfg = self.cfg
        dtype = dtype or self.lm_head.weight.dtype
        (kh, kw), (vh, vw) = cfg.cache_dims()  # MLA: k and v differ
        return [torch.zeros((batch, kh, 0, kw) if j == 0 else (batch, vh, 0, vw), dtype=dtype)
                for _ in range(cfg.num_hidden_layers) for j in (0, 1)]
