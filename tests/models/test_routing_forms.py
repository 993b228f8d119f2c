"""TopKRouting version 3 (sigmoid scores, selection-only bias, grouped top-k, routed scaling,
sparsemixer): every form against the float64 numpy oracle, and the torch op and the ONNX body
against transformers' own routers (DeepSeek-V2's group_limited_greedy, DeepSeek-V3's sigmoid +
e_score_correction_bias + top-2-sum groups, PhiMoE's ``sparsemixer``) on crafted near-tie inputs.

Near ties: experts or groups whose scores differ by a few fp32 ulps (the logits are built so the
scores land there), and sparsemixer logits whose relative distance to the max sits exactly on, and
one ulp past, the 2 * eps threshold. Exact ties are the contract's (lowest index, ONNX TopK), which
torch's CPU topk does not promise; they are not asked of transformers here.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from mixport import ops
from mixport.exporter import routing_onnx
from mixport.models.routing import topk_routing
from mixport.plugins.kernels.reference import reference_routing
from tests.helpers import require_module

SPECS = {  # name -> (spec, experts)
    "v3": (ops.RoutingSpec(4, "renormalize", scoring="sigmoid", bias=True, n_group=4, topk_group=2,
                           group_score="top2_sum", scaling=2.5), 16),
    "v2_grouped": (ops.RoutingSpec(3, "none", n_group=4, topk_group=2, group_score="max", scaling=16.0), 16),
    "v2_greedy": (ops.RoutingSpec(6, "none", scaling=1.5), 16),
    "sigmoid_bias": (ops.RoutingSpec(2, "none", scoring="sigmoid", bias=True), 8),
    "softmax_bias_max": (ops.RoutingSpec(2, "renormalize", bias=True, n_group=2, topk_group=1), 8),
    "sparsemixer": (ops.RoutingSpec(2, "none", scoring="sparsemixer", eps=0.01), 8),
}


def body_session(spec: ops.RoutingSpec, experts: int) -> ort.InferenceSession:
    """One TopKRouting node with its function body, in a plain ONNX Runtime session."""
    fn = routing_onnx.routing_function(spec.k, spec.normalization, TensorProto.FLOAT, spec.order, spec=spec,
                                       num_experts=experts)
    vi = helper.make_tensor_value_info
    inputs = [vi("logits", TensorProto.FLOAT, ["T", experts])] + (
        [vi("bias", TensorProto.FLOAT, [experts])] if spec.bias else [])
    node = helper.make_node(ops.TOPK_ROUTING, [i.name for i in inputs], ["weights", "ids"], domain=ops.DOMAIN,
                            **routing_onnx.routing_attributes(spec.k, experts, spec.normalization, spec=spec))
    graph = helper.make_graph([node], "routing", inputs, [vi("weights", TensorProto.FLOAT, None),
                                                          vi("ids", TensorProto.INT64, None)])
    model = helper.make_model(graph, functions=[fn], opset_imports=[
        helper.make_opsetid("", ops.ONNX_OPSET), helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION)])
    model.ir_version = 9
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run_body(spec: ops.RoutingSpec, experts: int, logits: np.ndarray, bias: np.ndarray | None):
    feed = {"logits": logits} if bias is None else {"logits": logits, "bias": bias}
    return body_session(spec, experts).run(None, feed)


def run_op(spec: ops.RoutingSpec, logits: np.ndarray, bias: np.ndarray | None):
    w, ids = topk_routing(torch.from_numpy(logits), spec.k, spec.normalization, spec.order,
                          None if bias is None else torch.from_numpy(bias), spec.scoring, spec.n_group,
                          spec.topk_group, spec.group_score, spec.scaling, spec.eps)
    return w.numpy(), ids.numpy()


def run_oracle(spec: ops.RoutingSpec, logits: np.ndarray, bias: np.ndarray | None):
    return reference_routing(logits, spec.k, spec.normalization, spec.order, scoring=spec.scoring, bias=bias,
                             n_group=spec.n_group, topk_group=spec.topk_group, group_score=spec.group_score,
                             scaling=spec.scaling, eps=spec.eps)


@pytest.mark.parametrize("name", list(SPECS))
def test_forms_match_oracle(name: str) -> None:
    spec, experts = SPECS[name]
    rng = np.random.default_rng(len(name))
    logits = (rng.standard_normal((53, experts)) * 2).astype(np.float32)
    bias = (rng.standard_normal(experts) * 0.3).astype(np.float32) if spec.bias else None
    ref_w, ref_ids = run_oracle(spec, logits, bias)
    for form, (w, ids) in {"torch op": run_op(spec, logits, bias),
                           "ONNX body": run_body(spec, experts, logits, bias)}.items():
        assert (ids == ref_ids).all(), form
        np.testing.assert_allclose(w, ref_w, rtol=2e-6, atol=2e-6, err_msg=form)
    if spec.bias or spec.n_group > 1:  # the forms really route apart from the logits' top-k
        assert (np.sort(ref_ids, 1) != np.sort(np.argsort(-logits, 1)[:, :spec.k], 1)).any(axis=1).sum() > 5


def test_attributes_round_trip() -> None:
    """New files carry version "3" with every field; a version-"2" node's attributes read as a plain spec."""
    assert routing_onnx.routing_attributes(2, 8, "renormalize")["plugin_version"] == "3"
    attrs = routing_onnx.routing_attributes(2, 8, "none", spec=SPECS["sparsemixer"][0])
    assert attrs["plugin_version"] == ops.ROUTING_PLUGIN_VERSION == "3"
    assert ops.RoutingSpec.from_attributes(attrs) == SPECS["sparsemixer"][0]
    assert ops.RoutingSpec.from_attributes({"k": 2, "normalization": "none"}).plain


@pytest.mark.parametrize("spec, experts, why", [
    (ops.RoutingSpec(3, "none", scoring="sparsemixer"), 8, "sparsemixer routes top-2"),
    (ops.RoutingSpec(2, "none", n_group=3), 8, "must divide"),
    (ops.RoutingSpec(2, "none", n_group=4, topk_group=5), 8, "topk_group"),
    (ops.RoutingSpec(5, "none", n_group=4, topk_group=2), 8, "exceeds the experts of the kept groups"),
    (ops.RoutingSpec(2, "none", order="topk_softmax", scoring="sigmoid"), 8, "topk_softmax"),
])
def test_inconsistent_specs_refused(spec: ops.RoutingSpec, experts: int, why: str) -> None:
    assert why in (spec.problem(experts) or "")
    with pytest.raises(ValueError, match=why):
        routing_onnx.routing_function(spec.k, spec.normalization, TensorProto.FLOAT, spec=spec, num_experts=experts)


# -- near ties against transformers' own routers ---------------------------------------------------------

def _ulps(x: np.ndarray, n: np.ndarray | int) -> np.ndarray:
    """x moved n fp32 ulps (n < 0: down), elementwise; the ulp of max(|x|, 1) (a logit near 0 moved by its
    own tiny ulp would leave the scores exactly tied)."""
    x = np.asarray(x, np.float32)
    step = np.spacing(np.maximum(np.abs(x), np.float32(1)))
    return (x + np.asarray(n, np.float32) * step).astype(np.float32)


def _router(cls, config, logits: np.ndarray, bias: np.ndarray | None = None):
    """transformers' router with an identity gate (hidden = E), so its logits are exactly ``logits``."""
    router = cls(config).eval()
    with torch.no_grad():
        router.weight.copy_(torch.eye(logits.shape[1]))
        if bias is not None:
            router.e_score_correction_bias.copy_(torch.from_numpy(bias))
        _, w, ids = router(torch.from_numpy(logits))
    order = torch.argsort(ids, dim=-1)  # transformers picks with sorted=False: compare as sets
    return w.gather(1, order).numpy(), ids.gather(1, order).numpy()


def _as_sets(w: np.ndarray, ids: np.ndarray):
    order = np.argsort(ids, axis=1)
    return np.take_along_axis(w, order, 1), np.take_along_axis(ids, order, 1)


def _agree(spec, experts, logits, bias, hf_w, hf_ids, forms=("torch op", "ONNX body")) -> None:
    runs = {"torch op": lambda: run_op(spec, logits, bias), "ONNX body": lambda: run_body(spec, experts, logits, bias)}
    for form in forms:
        w, ids = runs[form]()
        w, ids = _as_sets(w, ids)
        assert (ids == hf_ids).all(), (form, np.nonzero((ids != hf_ids).any(1))[0])
        np.testing.assert_allclose(w, hf_w, rtol=1e-6, atol=1e-7, err_msg=form)


def _near_tie_groups(rng: np.random.Generator, rows: int, experts: int, groups: int, ulps: int) -> np.ndarray:
    """Logits where two groups nearly tie: a random row, then one group copied (shuffled) into another
    and each of its logits moved by +-1..3 x ``ulps`` fp32 ulps: no exact tie, either group may win
    (and, when both are kept, either's experts) by a hair."""
    size = experts // groups
    out = (rng.standard_normal((rows, experts)) * 1.5).astype(np.float32)
    for r in range(rows):
        a, b = rng.choice(groups, 2, replace=False)
        copy = out[r, a * size:(a + 1) * size][rng.permutation(size)]
        nudge = rng.integers(1, 4, size) * rng.choice([-1, 1], size) * ulps
        out[r, b * size:(b + 1) * size] = _ulps(copy, nudge)
    return out


# The torch op makes transformers' torch calls: it agrees at 1-ulp logit nudges (bitwise). ONNX Runtime's
# Softmax / Sigmoid round differently from torch's by an ulp or two, so the body is held to nudges of 64 ulps
# (~8e-6 relative; the scores then differ by a few ulps to tens of ulps: still near ties).
TIERS = ((1, ("torch op",)), (64, ("torch op", "ONNX body")))


def test_deepseek_v2_group_limited_greedy_near_ties() -> None:
    require_module("transformers")
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    spec, experts = ops.RoutingSpec(3, "none", n_group=4, topk_group=2, group_score="max", scaling=16.0), 16
    config = DeepseekV2Config(hidden_size=experts, num_attention_heads=2, num_key_value_heads=2,
                              n_routed_experts=experts, num_experts_per_tok=3, n_group=4,
                              topk_group=2, topk_method="group_limited_greedy", routed_scaling_factor=16.0)
    for ulps, forms in TIERS:
        logits = _near_tie_groups(np.random.default_rng(1), 128, experts, 4, ulps)
        hf_w, hf_ids = _router(DeepseekV2TopkRouter, config, logits)
        _agree(spec, experts, logits, None, hf_w, hf_ids, forms)


def test_deepseek_v3_sigmoid_bias_top2_sum_near_ties() -> None:
    require_module("transformers")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    spec, experts = SPECS["v3"]
    config = DeepseekV3Config(hidden_size=experts, num_attention_heads=2, num_key_value_heads=2,
                              n_routed_experts=experts, num_experts_per_tok=4, n_group=4,
                              topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    bias = np.zeros(experts, np.float32)  # equal within-group biases keep the copied groups' near tie ...
    bias[8:] = np.float32(0.0625)  # ... while groups 2, 3 are lifted for selection only
    for ulps, forms in TIERS:
        logits = _near_tie_groups(np.random.default_rng(2), 128, experts, 4, ulps)
        hf_w, hf_ids = _router(DeepseekV3TopkRouter, config, logits, bias)
        _agree(spec, experts, logits, bias, hf_w, hf_ids, forms)
    unbiased = run_op(ops.RoutingSpec(4, "renormalize", scoring="sigmoid", n_group=4, topk_group=2,
                                      group_score="top2_sum", scaling=2.5), logits, None)[1]
    assert (np.sort(unbiased, 1) != hf_ids).any(axis=1).sum() > 5  # the bias changes the picks


def test_sparsemixer_threshold_edge() -> None:
    """Logits whose relative distance to the round's max is exactly float32(2 eps) stay in the softmax,
    one ulp past it they are masked; near-tied first and second experts; eps as PhiMoE's 0.01."""
    require_module("transformers")
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    spec, experts = SPECS["sparsemixer"]
    eps = spec.eps
    rng = np.random.default_rng(3)
    rows = []
    for r in range(48):
        x = (rng.standard_normal(experts) * 0.5).astype(np.float32)
        top = np.float32(3.0 + r / 16)
        x[r % experts] = top
        edge = np.float32(top - np.float32(2 * eps) * top)  # (top - edge) / top ~ 2 eps
        # walk to the last logit that is NOT masked, in fp32 as every form computes it
        while (top - edge) / max(abs(edge), top) > np.float32(2 * eps):
            edge = np.nextafter(edge, np.float32(np.inf))
        while (top - np.nextafter(edge, np.float32(-np.inf))) / top <= np.float32(2 * eps):
            edge = np.nextafter(edge, np.float32(-np.inf))
        x[(r + 1) % experts] = edge  # on the edge: kept
        x[(r + 2) % experts] = np.nextafter(edge, np.float32(-np.inf))  # one ulp past: masked
        if r % 4 == 0:  # second round's near tie: two runners-up an ulp apart
            x[(r + 3) % experts] = _ulps(x[(r + 1) % experts:(r + 1) % experts + 1], 1)[0]
        rows.append(x)
    logits = np.stack(rows)
    w, ids = sparsemixer(torch.from_numpy(logits), jitter_eps=eps, training=False)
    hf_w, hf_ids = _as_sets(w.numpy(), ids.numpy())
    _agree(spec, experts, logits, None, hf_w, hf_ids)
    tighter = run_op(ops.RoutingSpec(2, "none", scoring="sparsemixer", eps=eps * (1 - 1e-5)), logits, None)[0]
    looser = run_op(ops.RoutingSpec(2, "none", scoring="sparsemixer", eps=eps * (1 + 1e-5)), logits, None)[0]
    for other in (tighter, looser):  # the inputs sit on the threshold: moving it changes the first weights
        assert (np.abs(other[:, 0] - w.numpy()[:, 0]) > 1e-3).mean() > 0.9
