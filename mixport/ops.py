"""The mixport op contract: names, attributes and layouts shared by every stage.

Two custom-domain nodes, each carrying a model-local ONNX function body:

``TopKRouting`` (domain ``mixport``)
    inputs:  logits  [T, E] float (fp32/fp16/bf16)
    outputs: weights [T, k] same float type as logits
             ids     [T, k] int64, expert indices, ordered by descending weight
    attrs:   k (int), num_experts (int), scoring_func (str: "softmax"),
             order (str: "softmax_topk" | "topk_softmax"; absent: "softmax_topk"),
             normalization (str: "renormalize" | "none"),
             plugin_namespace="mixport", plugin_version="2" (files written before
             ``order`` existed say "1": read as order "softmax_topk")
    Computed in fp32. "softmax_topk": softmax over the E logits, then the top k
    (Mixtral, Qwen-MoE, OLMoE); "topk_softmax": the top k of the logits, then a
    softmax over those k (Granite; the same experts, and weights equal to
    softmax_topk + renormalize up to rounding). Then "renormalize" divides the k
    weights by their sum (Mixtral, Qwen3-MoE); "none" keeps them (Qwen2-MoE with
    norm_topk_prob=false, OLMoE, Granite).

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
``order``); every reader keeps accepting the older versions (``ROUTING_PLUGIN_VERSIONS``), and the
TensorRT plugins register one creator per version.

One implementation per form: the ONNX ops that compute ``TopKRouting`` are built only by
``exporter/routing_onnx.routing_nodes``, those of ``MoE`` only by ``passes/moe_bodies``
(function bodies ``sorted`` / ``nonzero`` / ``dense`` and the fast ONNX Runtime graph's
``ORT_CPU`` variant); the kernels are ``plugins/kernels`` (Triton). The oracle every form is
tested against is the float64 numpy reference, ``plugins/kernels/reference.py``.
"""

from __future__ import annotations

ONNX_OPSET = 18  # the standard-domain opset of every graph and function body mixport writes
DOMAIN = "mixport"
OPSET_VERSION = 1
PLUGIN_NAMESPACE = "mixport"
PLUGIN_VERSION = "1"  # the MoE node's, float experts
QUANT_PLUGIN_VERSION = "2"  # the MoE node's, quantized experts: "2" added the scale/zero inputs, bits, block_size
BIAS_PLUGIN_VERSION = "3"  # the MoE node's with expert biases / swiglu_clamped: "3" added the bias inputs, alpha, limit
MOE_PLUGIN_VERSIONS = ("1", "2", "3")
QUANT_OPSET = 21  # blocked DequantizeLinear and the int4/uint4 types need opset 21
ROUTING_PLUGIN_VERSION = "2"  # the TopKRouting node's: "2" added ``order`` (absent in "1": softmax_topk)
ROUTING_PLUGIN_VERSIONS = ("1", "2")  # what the plugins and readers accept

TOPK_ROUTING = "TopKRouting"
MOE = "MoE"

SCORING_FUNCS = ("softmax",)
NORMALIZATIONS = ("renormalize", "none")
ORDERS = ("softmax_topk", "topk_softmax")  # the first: the default (version-1 files)
ACTIVATIONS = ("swiglu", "swiglu_clamped")
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0  # GPT-OSS's swiglu_clamped constants (the alpha / limit defaults)
MOE_INPUTS = ("hidden", "weights", "ids", "gate_up", "down")
QUANT_INPUTS = ("gate_up_scale", "down_scale")  # after MOE_INPUTS in a quantized MoE node
ZERO_INPUTS = ("gate_up_zero", "down_zero")  # after QUANT_INPUTS, uint4 weights only
BIAS_INPUTS = ("gate_up_bias", "down_bias")  # the last two inputs of a plugin_version "3" node
