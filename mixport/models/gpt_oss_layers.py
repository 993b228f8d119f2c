"""GPT-OSS's reference modules: attention with sinks, a router with a bias, experts with biases
and the clamped SwiGLU (``ops.py`` MoE activation "swiglu_clamped"). The decoder layer is the
shared ``components.DecoderLayer`` with these modules in place of its attention and MoE block.

Legend: B batch, S new tokens, P past tokens, T = B*S tokens, H hidden, Q query heads,
D head dim, E experts, k active, F intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import nn

from mixport.models.components import Attention, DecoderLayer, Experts, Layout, Router
from mixport.models.config import MoEConfig


class SinkAttention(Attention):
    """Attention whose softmax also sees one learned logit per query head (``sinks`` [Q]); the
    sink's share of the probability is dropped, so each row's weights sum to less than 1."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        self.sinks = nn.Parameter(torch.zeros(cfg.num_attention_heads))

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """The softmax over the scores [B, Q, S, P+S] and each head's sink, the sink's column dropped."""
        b, _, s, _ = scores.shape
        sink = self.sinks.float().reshape(1, -1, 1, 1).expand(b, -1, s, 1)  # [B, Q, S, 1]
        return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class ClampedExpert(nn.Module):
    """One GPT-OSS expert: down(clamped_swiglu(gate(x), up(x))), each projection with a bias."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.alpha, self.limit = cfg.swiglu_alpha, cfg.swiglu_limit
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, f), nn.Linear(h, f), nn.Linear(f, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(clamped_swiglu(self.gate_proj(x), self.up_proj(x), self.alpha, self.limit))


class BiasedRouter(Router):
    """The router Linear with a bias; then top-k of the logits -> softmax over the k."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.num_local_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from mixport.models.routing import topk_routing

        return topk_routing(Fn.linear(x, self.weight, self.bias), self.k, self.normalization, self.order)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return Fn.linear(x, self.weight, self.bias).float()


class BiasedMoeBlock(nn.Module):
    """GPT-OSS's ``mlp``: ``router`` + ``experts`` (no shared expert)."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.router = BiasedRouter(cfg)
        self.experts = Experts(ClampedExpert(cfg) for _ in range(cfg.num_local_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        flat = x.reshape(-1, h)  # [T, H]
        weights, ids = self.router(flat)
        return self.experts(flat, weights, ids).reshape(b, s, h)


def decoder_layer(cfg: MoEConfig, index: int, layout: Layout) -> DecoderLayer:
    """The shared decoder layer with GPT-OSS's attention (sinks) and MoE block (``layout.moe``)."""
    with torch.device("meta"):  # the shared layer's own modules, replaced below: never allocated
        layer = DecoderLayer(cfg, index, layout)
    dev = torch.empty(0).device
    layer.input_layernorm = layer.input_layernorm.to_empty(device=dev)
    layer.post_attention_layernorm = layer.post_attention_layernorm.to_empty(device=dev)
    nn.init.ones_(layer.input_layernorm.weight)
    nn.init.ones_(layer.post_attention_layernorm.weight)
    layer.self_attn = SinkAttention(cfg) if cfg.attention_sinks else Attention(cfg)
    setattr(layer, layout.moe, BiasedMoeBlock(cfg))
    return layer
