"""The router's top-k step as one torch custom op that exports to ``mixport::TopKRouting``.

Eager, in fp32: softmax -> top-k -> optional renormalize (order ``softmax_topk``: Mixtral, Qwen,
OLMoE), or top-k of the logits -> softmax over the k (order ``topk_softmax``: Granite), each
family's exact math.
Export: the op lowers to one ONNX node; ``routing_function`` gives the node a
model-local function body of standard ops so any ONNX runtime can run it.
"""

from __future__ import annotations

import torch

# T tokens, E experts, k active experts per token


@torch.library.custom_op("mixport::topk_routing", mutates_args=())
def topk_routing(logits: torch.Tensor, k: int, normalization: str,
                 order: str = "softmax_topk") -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> weights [T, k] (logits dtype), ids [T, k] int64."""
    if order == "topk_softmax":
        top, ids = torch.topk(logits.float(), k, dim=-1)  # [T, k]
        weights = torch.softmax(top, dim=-1)
    else:
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        weights, ids = torch.topk(probs, k, dim=-1)  # [T, k]
    if normalization == "renormalize":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


@topk_routing.register_fake
def _(logits: torch.Tensor, k: int, normalization: str, order: str = "softmax_topk"
      ) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*logits.shape[:-1], k)
    return logits.new_empty(shape), logits.new_empty(shape, dtype=torch.int64)
