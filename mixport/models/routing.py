"""The router's top-k step as one torch custom op that exports to ``mixport::TopKRouting``.

Eager: softmax in fp32 -> top-k -> optional renormalize (HF Mixtral's exact math).
Export: the op lowers to one ONNX node; ``routing_function`` gives the node a
model-local function body of standard ops so any ONNX runtime can run it.
"""

from __future__ import annotations

import torch

# T tokens, E experts, k active experts per token


@torch.library.custom_op("mixport::topk_routing", mutates_args=())
def topk_routing(logits: torch.Tensor, k: int, normalization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> weights [T, k] (logits dtype), ids [T, k] int64."""
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, k, dim=-1)  # [T, k]
    if normalization == "renormalize":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


@topk_routing.register_fake
def _(logits: torch.Tensor, k: int, normalization: str) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*logits.shape[:-1], k)
    return logits.new_empty(shape), logits.new_empty(shape, dtype=torch.int64)
