"""`mixport check`'s routing hooks with TopKRouting version 3: the experts compared are those the
router SELECTS (with a selection bias or groups: not the top-k of the logits), on both PyTorch sides
(mixport's reference and transformers' logits run through mixport's Router), and a token whose choice
scores or group scores tie at the boundary counts as a tie."""

from __future__ import annotations

import numpy as np
import torch

from mixport.models.components import Router
from mixport.models.config import MoEConfig
from mixport.tools import check
from mixport.tools.torch_runners import _routing

CFG = MoEConfig(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, num_local_experts=8, num_experts_per_tok=2, head_dim=8, scoring="sigmoid",
                selection_bias=True, n_group=4, topk_group=2, group_score="top2_sum")


def _router() -> Router:
    torch.manual_seed(0)
    router = Router(CFG)
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 0.5, -0.5, -0.5]))
    return router


def test_routing_hook_reports_the_selected_experts() -> None:
    router = _router()
    logits = torch.randn(64, 8) * 2
    out = _routing([logits], [router], 2, 1, "test")
    np.testing.assert_array_equal(out["routing.0.ids"], router.route(logits)[1].numpy())
    plain = torch.topk(logits, 2).indices.numpy()
    assert (np.sort(out["routing.0.ids"], 1) != np.sort(plain, 1)).any(axis=1).sum() > 5
    assert out["routing.0.choice"].shape == (64, 8) and out["routing.0.groups"].shape == (64, 4)
    assert np.isinf(out["routing.0.choice"]).sum(axis=1).tolist() == [4] * 64  # two groups of two masked


def test_group_ties_count_as_ties() -> None:
    """Two groups tied at the kept / dropped boundary: either pick is right (the experts differ entirely)."""
    router = _router()
    logits = torch.tensor([[1.0, 0.2, 3.0, -1.0, -0.5, 0.1, 2.0, 1.9]])
    with torch.no_grad():
        router.e_score_correction_bias.zero_()
    logits[0, 4:6] = logits[0, 0:2]  # group 2 == group 0
    ref = _routing([logits], [router], 2, 1, "ref")
    other = dict(ref, **{"routing.0.ids": np.array([[4, 0]])})  # a pick from the tied group
    stat = check._routing_stats([ref], [other], [0], 2, topk_group=2)[0]
    assert stat.ties == 1 and stat.passed
    stat = check._routing_stats([ref], [other], [0], 2, topk_group=1)[0]  # the boundary after group 3: no tie
    assert stat.ties == 0 and not stat.passed
