"""The mixport op contract: names, attributes and layouts shared by every stage.

Two custom-domain nodes, each carrying a model-local ONNX function body:

``TopKRouting`` (domain ``mixport``)
    inputs:  logits  [T, E] float (fp32/fp16/bf16)
             bias    [E] float, optional (version "3"): the selection-only bias
    outputs: weights [T, k] same float type as logits
             ids     [T, k] int64, expert indices, ordered by descending selection score
    attrs:   k (int), num_experts (int),
             scoring_func (str: "softmax" | "sigmoid" | "sparsemixer"; "sigmoid", "sparsemixer": "3"),
             order (str: "softmax_topk" | "topk_softmax"; absent: "softmax_topk"),
             normalization (str: "renormalize" | "none"),
             version "3" adds (absent: the neutral value in brackets):
             n_group (int [1]), topk_group (int [1]), group_score (str: "max" | "top2_sum" ["max"]),
             routed_scaling_factor (float [1.0]), sparsemixer_eps (float [0.0]),
             plugin_namespace="mixport", plugin_version="3" (files written before
             ``order`` existed say "1": read as order "softmax_topk"; "2" files have none of the
             version-3 attributes and one input)
    Computed in fp32. Scores: "softmax" over the E logits (order "softmax_topk": Mixtral, Qwen-MoE,
    OLMoE, DeepSeek-V2), the logits themselves (order "topk_softmax": Granite; then a softmax over the
    k picked, the same experts and weights as softmax_topk + renormalize up to rounding), or
    "sigmoid" of each logit (DeepSeek-V3). Selection: choice = scores + bias (when the input is
    given); with n_group > 1 the E experts form n_group consecutive groups of E / n_group, a group
    scores its best choice ("max": DeepSeek-V2 group_limited_greedy) or its two best summed
    ("top2_sum": DeepSeek-V3), the topk_group best groups are kept and the other experts' choices
    set to -inf; the top k of the choices are the ids. Weights: the UNBIASED scores of those k;
    "renormalize" divides them by their sum (Mixtral, Qwen3-MoE, DeepSeek-V3 with norm_topk_prob;
    sigmoid: by sum + 1e-20, as DeepSeek-V3); "none" keeps them (Qwen2-MoE with norm_topk_prob=false,
    OLMoE, Granite, DeepSeek-V2). Finally weights x routed_scaling_factor.
    "sparsemixer" (PhiMoE, k = 2, inference path; order softmax_topk, normalization none, no bias or
    groups): eps = sparsemixer_eps (config.json's router_jitter_noise); round one picks
    i1 = argmax(x) (the first index among equal maxima), m1 = x[i1], masks every expert with
    (m1 - x) / max(|x|, m1) > 2 eps to -inf and takes w1 = softmax(masked x)[i1]; round two sets
    x[i1] = -inf, picks i2 = argmax, m2 = its logit, masks (m2 - x) / max(|x|, m2) > 2 eps (x the
    unmasked logits, as transformers) and takes w2 = softmax(masked)[i2]; no renormalization.
    Ties in the top-k (exactly equal choices) go to the lower expert index (ONNX TopK's rule; torch's
    topk on CPU may pick another of the tied experts: ``mixport check`` counts such tokens as ties).

``MoE`` (domain ``mixport``)
    inputs:  hidden  [T, H]
             weights [T, k]   (TopKRouting output 0)
             ids     [T, k]   int64 (TopKRouting output 1)
             gate_up [E, H, 2F]  per expert, x @ gate_up[e] -> [T, 2F];
                                 columns [0, F) are the gate (w1), [F, 2F) the up (w3)
             down    [E, F, H]   per expert, act @ down[e] -> [T, H]  (w2)
    outputs: out     [T, H] = sum_j weights[t, j] * FFN_{ids[t, j]}(hidden[t])
             FFN_e(x) = (silu(x @ gate_e) * (x @ up_e)) @ down_e
    attrs:   num_experts (int), k (int), activation (str: "swiglu"),
             plugin_namespace="mixport", plugin_version="1"
    Quantized experts (``plugin_version="2"``, written by ``mixport export --quantize``; see
    ``mixport/quant.py`` for the numbers): gate_up and down hold integers instead of floats and
    three or five more inputs follow (a reader of version "1" would misread them):
             gate_up [E, H, 2F]  int8 | int4 | uint4   (same layout as above)
             down    [E, F, H]   int8 | int4 | uint4
             gate_up_scale [E, ceil(H/B), 2F]  hidden's float type (one scale per expert,
                                 per block of B input rows, per output column)
             down_scale    [E, ceil(F/B), H]
             gate_up_zero  [E, ceil(H/B), 2F] uint4  (only with uint4 weights: int4 with zero points)
             down_zero     [E, ceil(F/B), H]  uint4
    attrs:   + bits (int: 8 | 4), block_size (int: B, a power of two; H and F need not be multiples)
    expert e's float weights are ONNX's blocked DequantizeLinear(q[e], scale[e], zero[e],
    axis=0, block_size=B) = (q - zero) * scale; the FFN is then computed as above. Scales are
    never shared across experts; the router (TopKRouting's input) is never quantized.
    Dense weights of a quantized export (attention q/k/v/o, shared experts, dense MLPs, lm_head
    with --quantize-lm-head) are DequantizeLinear(q [in, out], scale [ceil(in/B), out][, zero],
    axis=0, block_size=B) -> MatMul; a quantized model imports the standard opset QUANT_OPSET.
    Routed experts only: a family's shared expert (Qwen2-MoE, GraniteMoeShared) stays beside
    the node as ordinary MatMuls (a dense FFN every token runs; docs/passes.md), so the fused
    graph has one MoE node per MoE layer and this contract is the same for every family.
    Expert biases and the clamped SwiGLU (``plugin_version="3"``, GPT-OSS): the inputs of a version "1"
    (float) or "2" (quantized: ``bits`` present) node, then always two more (zeros where a model has none):
             gate_up_bias [E, 2F]  hidden's float type, never quantized; [0, F) gate, [F, 2F) up
             down_bias    [E, H]
    attrs:   activation (str: "swiglu" | "swiglu_clamped"), alpha (float), limit (float)
    FFN_e(x) = (act(x @ gate_e + bg_e, x @ up_e + bu_e)) @ down_e + bd_e, where "swiglu" is
    silu(g) * u and "swiglu_clamped" is (clamp(u, -limit, limit) + 1) * c * sigmoid(alpha * c) with
    c = min(g, limit) (GPT-OSS: alpha 1.702, limit 7.0). Checkpoints that interleave gate and up
    columns (GPT-OSS's ``gate_up_proj[..., ::2]`` is the gate) are de-interleaved at export: every
    form sees the gate-first layout above. Files without biases or the clamped activation keep
    writing "1" / "2", so older readers still read them.
    Layout rationale: row-major [in, out] per expert is what ONNX MatMul takes
    without a Transpose, so the portable body gathers an expert's slab and
    multiplies directly; fusing gate and up into one [H, 2F] slab halves the
    GEMM launches and streams one contiguous block per expert.

Versions: a field whose meaning a reader must know bumps ``plugin_version`` (TopKRouting "2" added
``order``, "3" the bias input, sigmoid / sparsemixer scoring, groups and the scaling factor); every
reader keeps accepting the older versions (``ROUTING_PLUGIN_VERSIONS``), and the
TensorRT plugins register one creator per version.

One implementation per form: the ONNX ops that compute ``TopKRouting`` are built only by
``exporter/routing_onnx.routing_nodes``, those of ``MoE`` only by ``passes/moe_bodies``
(function bodies ``sorted`` / ``nonzero`` / ``dense`` and the fast ONNX Runtime graph's
``ORT_CPU`` variant); the kernels are ``plugins/kernels`` (Triton). The oracle every form is
tested against is the float64 numpy reference, ``plugins/kernels/reference.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

ONNX_OPSET = 18  # the standard-domain opset of every graph and function body mixport writes
DOMAIN = "mixport"
OPSET_VERSION = 1
PLUGIN_NAMESPACE = "mixport"
PLUGIN_VERSION = "1"  # the MoE node's, float experts
QUANT_PLUGIN_VERSION = "2"  # the MoE node's, quantized experts: "2" added the scale/zero inputs, bits, block_size
BIAS_PLUGIN_VERSION = "3"  # the MoE node's with expert biases / swiglu_clamped: "3" added the bias inputs, alpha, limit
MOE_PLUGIN_VERSIONS = ("1", "2", "3")
QUANT_OPSET = 21  # blocked DequantizeLinear and the int4/uint4 types need opset 21
ROUTING_PLUGIN_VERSION = "3"  # the TopKRouting node's: "2" added ``order`` (absent in "1": softmax_topk),
#                               "3" the bias input, sigmoid / sparsemixer scoring, groups, routed scaling
ROUTING_PLUGIN_VERSIONS = ("1", "2", "3")  # what the plugins and readers accept

TOPK_ROUTING = "TopKRouting"
MOE = "MoE"

SCORING_FUNCS = ("softmax", "sigmoid", "sparsemixer")  # the first: the default (versions "1", "2")
GROUP_SCORES = ("max", "top2_sum")  # a group's score: its best expert's, or its two best summed
NORMALIZATIONS = ("renormalize", "none")
ORDERS = ("softmax_topk", "topk_softmax")  # the first: the default (version-1 files)
ACTIVATIONS = ("swiglu", "swiglu_clamped")
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0  # GPT-OSS's swiglu_clamped constants (the alpha / limit defaults)
MOE_INPUTS = ("hidden", "weights", "ids", "gate_up", "down")
QUANT_INPUTS = ("gate_up_scale", "down_scale")  # after MOE_INPUTS in a quantized MoE node
ZERO_INPUTS = ("gate_up_zero", "down_zero")  # after QUANT_INPUTS, uint4 weights only
BIAS_INPUTS = ("gate_up_bias", "down_bias")  # the last two inputs of a plugin_version "3" node


@dataclass(frozen=True)
class RoutingSpec:
    """What one TopKRouting node computes (its attributes, and whether it has the bias input).
    The defaults are the neutral values: a version-"1"/"2" node reads as the spec of its attributes."""

    k: int
    normalization: str = "renormalize"
    order: str = ORDERS[0]
    scoring: str = SCORING_FUNCS[0]
    bias: bool = False  # the selection-only bias input is given
    n_group: int = 1
    topk_group: int = 1
    group_score: str = GROUP_SCORES[0]
    scaling: float = 1.0  # routed_scaling_factor
    eps: float = 0.0  # sparsemixer_eps

    @property
    def plain(self) -> bool:
        """Nothing version "3" added: a version-"2" reader computes this node."""
        return (self.scoring == SCORING_FUNCS[0] and not self.bias and self.n_group == 1
                and self.scaling == 1.0 and self.eps == 0.0)

    def problem(self, num_experts: int) -> str | None:
        """What is inconsistent in this spec for ``num_experts`` experts (None: nothing)."""
        if self.scoring not in SCORING_FUNCS:
            return f"scoring_func must be one of {SCORING_FUNCS}, got {self.scoring!r}"
        if self.normalization not in NORMALIZATIONS:
            return f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}"
        if self.order not in ORDERS:
            return f"order must be one of {ORDERS}, got {self.order!r}"
        if self.group_score not in GROUP_SCORES:
            return f"group_score must be one of {GROUP_SCORES}, got {self.group_score!r}"
        if not 1 <= self.k <= num_experts:
            return f"k must be in [1, {num_experts}], got {self.k}"
        if self.order != ORDERS[0] and (self.scoring != "softmax" or self.bias or self.n_group > 1):
            return "order topk_softmax goes with plain softmax scoring only (no bias, no groups)"
        if self.scoring == "sparsemixer" and (self.k != 2 or self.bias or self.n_group > 1
                                              or self.normalization != "none"):
            return "sparsemixer routes top-2 with normalization none, no bias and no groups"
        if self.n_group < 1 or num_experts % self.n_group:
            return f"n_group ({self.n_group}) must divide the {num_experts} experts"
        size = num_experts // self.n_group
        if not 1 <= self.topk_group <= self.n_group:
            return f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}"
        if self.n_group > 1 and self.group_score == "top2_sum" and size < 2:
            return "group_score top2_sum needs groups of at least 2 experts"
        if self.n_group > 1 and self.k > self.topk_group * size:
            return f"k ({self.k}) exceeds the experts of the kept groups ({self.topk_group} x {size})"
        if self.eps < 0 or self.scaling <= 0:
            return "sparsemixer_eps must be >= 0 and routed_scaling_factor > 0"
        return None

    def attributes(self) -> dict[str, object]:
        """The node attributes of this spec (besides k, num_experts and the plugin ones)."""
        return dict(normalization=self.normalization, order=self.order, scoring_func=self.scoring,
                    n_group=self.n_group, topk_group=self.topk_group, group_score=self.group_score,
                    routed_scaling_factor=float(self.scaling), sparsemixer_eps=float(self.eps))

    @classmethod
    def from_attributes(cls, attrs: Mapping[str, object], has_bias: bool = False) -> RoutingSpec:
        """The spec of a node's attributes (absent ones: their neutral values)."""
        def get(name: str, default: object) -> object:
            value = attrs.get(name, default)
            return value.decode() if isinstance(value, bytes) else value

        return cls(k=int(get("k", 1)), normalization=str(get("normalization", "renormalize")),  # type: ignore[arg-type]
                   order=str(get("order", ORDERS[0])), scoring=str(get("scoring_func", SCORING_FUNCS[0])),
                   bias=has_bias, n_group=int(get("n_group", 1)), topk_group=int(get("topk_group", 1)),  # type: ignore[arg-type]
                   group_score=str(get("group_score", GROUP_SCORES[0])),
                   scaling=float(get("routed_scaling_factor", 1.0)), eps=float(get("sparsemixer_eps", 0.0)))  # type: ignore[arg-type]
