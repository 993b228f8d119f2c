"""PhiMoE's reference decoder (torch): the shared components with Phi-3.5-MoE's own rotary scaling.

transformers 5's ``PhimoeRotaryEmbedding`` differs from the generic LongRoPE (``rope.py``): its
frequencies are always the SHORT factors' (it recomputes them without a sequence length on every call),
and cos / sin are multiplied by ``short_mscale``, or by ``long_mscale`` when max(position_ids) + 1
exceeds ``original_max_position_embeddings`` (one choice per forward call). Plain RoPE otherwise.
"""

from __future__ import annotations

import torch

from mixport.models.components import DecoderModel


class PhimoeDecoderModel(DecoderModel):
    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] -> cos, sin [B, 1, S, D] in ``dtype``."""
        cfg = self.cfg
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, S, D/2]; longrope: short factors
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if cfg.rope_type == "longrope":
            beyond = position_ids.max() + 1 > cfg.rope_original_max  # [] bool, one choice per call
            long, short = float(cfg.rope_long_mscale), float(cfg.rope_short_mscale)  # type: ignore[arg-type]
            cos = torch.where(beyond, cos * long, cos * short)  # as transformers' cos * mscale, bit for bit
            sin = torch.where(beyond, sin * long, sin * short)
        return cos[:, None].to(dtype), sin[:, None].to(dtype)
