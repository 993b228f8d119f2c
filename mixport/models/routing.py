"""The router's top-k step as one torch custom op that exports to ``mixport::TopKRouting``.

Eager, in fp32, each family's exact math (``ops.py`` states the contract):
softmax -> top-k -> optional renormalize (order ``softmax_topk``: Mixtral, Qwen, OLMoE), or top-k
of the logits -> softmax over the k (order ``topk_softmax``: Granite); sigmoid scores, a
selection-only bias and grouped top-k (DeepSeek-V2 / V3); PhiMoE's sparsemixer; then x a routed
scaling factor. The steps are written with the same torch calls as transformers' routers, so a
near tie is decided as transformers decides it.
Export: the op lowers to one ONNX node; ``routing_function`` gives the node a
model-local function body of standard ops so any ONNX runtime can run it.
"""

from __future__ import annotations

import torch

# T tokens, E experts, k active experts per token, G expert groups

RENORM_EPS = 1e-20  # sigmoid scoring's renormalization: w / (sum + this), as DeepSeek-V3


@torch.library.custom_op("mixport::topk_routing", mutates_args=())
def topk_routing(logits: torch.Tensor, k: int, normalization: str, order: str = "softmax_topk",
                 bias: torch.Tensor | None = None, scoring: str = "softmax", n_group: int = 1,
                 topk_group: int = 1, group_score: str = "max", scaling: float = 1.0,
                 eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> weights [T, k] (logits dtype), ids [T, k] int64.

    ``bias`` [E] (selection only), ``n_group`` / ``topk_group`` / ``group_score`` (grouped top-k),
    ``scaling`` (x the final weights), ``eps`` (sparsemixer's threshold, router_jitter_noise)."""
    x = logits.float()
    if scoring == "sparsemixer":
        weights, ids = sparsemixer(x, eps)
    else:
        scores = torch.sigmoid(x) if scoring == "sigmoid" else (
            x if order == "topk_softmax" else torch.softmax(x, dim=-1))  # [T, E]
        choice = scores if bias is None else scores + bias.float()
        if n_group > 1:
            choice = group_mask(choice, n_group, topk_group, group_score)
        top, ids = torch.topk(choice, k, dim=-1)  # [T, k]
        weights = top if choice is scores else scores.gather(1, ids)
        if order == "topk_softmax":
            weights = torch.softmax(weights, dim=-1)
        if normalization == "renormalize":
            total = weights.sum(dim=-1, keepdim=True)
            weights = weights / (total + RENORM_EPS if scoring == "sigmoid" else total)
    if scaling != 1.0:
        weights = weights * scaling
    return weights.to(logits.dtype), ids


@topk_routing.register_fake
def _(logits: torch.Tensor, k: int, normalization: str, order: str = "softmax_topk",
      bias: torch.Tensor | None = None, scoring: str = "softmax", n_group: int = 1, topk_group: int = 1,
      group_score: str = "max", scaling: float = 1.0, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*logits.shape[:-1], k)
    return logits.new_empty(shape), logits.new_empty(shape, dtype=torch.int64)


def group_mask(choice: torch.Tensor, n_group: int, topk_group: int, group_score: str) -> torch.Tensor:
    """choice [T, E] -> the same with every expert outside the ``topk_group`` best of ``n_group``
    groups set to -inf; a group's score is its best expert's ("max", DeepSeek-V2's
    group_limited_greedy) or its two best summed ("top2_sum", DeepSeek-V3)."""
    t, e = choice.shape
    scores = group_scores(choice, n_group, group_score)  # [T, G]
    keep = torch.zeros_like(scores).scatter_(1, torch.topk(scores, topk_group, dim=-1)[1], 1)  # [T, G]
    keep = keep.unsqueeze(-1).expand(-1, n_group, e // n_group).reshape(t, e)
    return choice.masked_fill(~keep.bool(), float("-inf"))


def group_scores(choice: torch.Tensor, n_group: int, group_score: str) -> torch.Tensor:
    """choice [T, E] -> each group's score [T, G] (its best choice, or its two best summed)."""
    grouped = choice.view(choice.shape[0], n_group, -1)  # [T, G, E/G]
    if group_score == "top2_sum":
        return grouped.topk(2, dim=-1)[0].sum(dim=-1)
    return grouped.max(dim=-1).values


def sparsemixer(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's inference routing, top-2: x [T, E] fp32 -> weights [T, 2], ids [T, 2].

    Round one: the arg-max expert; its weight is its softmax over the experts whose logit is
    within a relative 2 * eps of the max ((max - x) / max(|x|, max) <= 2 eps). Round two: the
    same with the first expert taken out (its threshold still measured against the unmasked x).
    No renormalization."""
    top1, id1 = x.max(dim=-1, keepdim=True)  # [T, 1]
    w1 = _threshold_softmax(x, x, top1, eps).gather(-1, id1)
    rest = torch.scatter(x, -1, id1, float("-inf"))
    top2, id2 = rest.max(dim=-1, keepdim=True)
    w2 = _threshold_softmax(rest, x, top2, eps).gather(-1, id2)
    return torch.cat((w1, w2), dim=-1), torch.cat((id1, id2), dim=-1)


def _threshold_softmax(gates: torch.Tensor, x: torch.Tensor, top: torch.Tensor, eps: float) -> torch.Tensor:
    """softmax of ``gates`` [T, E] with the experts whose x lies more than 2 eps (relative) below ``top`` masked."""
    factor = x.abs().clamp(min=top)
    masked = ((top - x) / factor) > (2 * eps)
    return torch.softmax(gates.masked_fill(masked, float("-inf")), dim=-1)
