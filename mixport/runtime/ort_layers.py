"""The fast graph's layers: attention, feed-forward (sparse experts, shared expert, dense MLP) and
the decoder stack, written through ``ort_emit.Builder`` from the config and the adapter's names.

Each switch of the config (``models/config.py``) maps onto what ONNX Runtime's CPU kernels run
fastest, and a config at its neutral values (Mixtral's) emits exactly the nodes it always did:

* attention: q/k/v as one MatMul (+ one bias Add, ``qkv_bias``); without q/k norms or clipping the
  packed result feeds GroupQueryAttention as is, else it is split, q and k are RMS-normed over each
  head (``qk_norm`` "head": a [.., heads, D] view) or over the projection ("projection"), q/k/v are
  clipped (``clip_qkv``), and GQA takes them as separate query/key/value (rotary inside, after the
  norms, as in the reference); ``scale`` is ``cfg.scale``; a layer's sliding window
  (``cfg.window(i)``) is GQA's ``local_window_size`` (measured on ONNX Runtime 1.32 CPU: a query at
  position p sees keys p-w+1..p, the reference's ``components.attention_bias``); attention sinks
  (``attention_sinks``, GPT-OSS) are GQA's ``head_sink`` (one logit per head joining the softmax's
  denominator); o_proj (+ bias);
* feed-forward: a sparse layer routes (``routing_onnx.routing_nodes``, the config's routing spec:
  order, normalization, sigmoid / sparsemixer, selection bias, groups, scaling; the router Linear's
  bias, ``router_bias``) into ``moe_bodies.sparse_moe`` (variant ``ORT_CPU``; expert biases and the
  clamped SwiGLU of a version-"3" MoE node, GPT-OSS) and adds its shared expert (one
  gate|up MatMul, optionally scaled by sigmoid(x @ gate)) beside it; a dense layer (``dense_layers``)
  is one SwiGLU MLP;
* muP scalars: embeddings x ``embedding_multiplier``; each block's output x ``residual_multiplier``
  before the residual add that ``SkipSimplifiedLayerNormalization`` fuses; logits / ``logits_scaling``.

Legend: B batch, S new tokens, T = B*S, H hidden, Q/G query/kv heads, D head dim, F intermediate.
"""

from __future__ import annotations

import numpy as np

from mixport import ops
from mixport.errors import RuntimeFailure
from mixport.exporter import routing_onnx
from mixport.models import rope
from mixport.passes import moe_bodies
from mixport.runtime import ort_qmoe
from mixport.runtime.ort_emit import MS, Builder


def _gate_up(g: Builder, gate: str, up: str, name: str) -> str:
    """One [H, 2F] weight ``name`` holding a SwiGLU's gate then up (the export's weights ``gate``, ``up``)."""
    return g.proj(name, [gate, up])


def _qkv(g: Builder, pre: str, h: str) -> str:
    """h [B, S, H] -> q|k|v [B, S, (Q+2G)*D] in one MatMul (+ the q|k|v bias)."""
    qkv_w = g.proj(f"{pre}.qkv_proj.weight", [f"{pre}.{p}_proj.weight" for p in "qkv"])  # [H, (Q+2G)*D]
    qkv = g.matmul(h, qkv_w)
    if g.cfg.qkv_bias:
        bias = np.concatenate([g.w[f"{pre}.{p}_proj.bias"] for p in "qkv"])
        qkv = g.op1("Add", [qkv, g.weight(f"{pre}.qkv_proj.bias", bias)])
    return qkv


def _rms(g: Builder, x: str, weight: str, heads: int) -> str:
    """RMSNorm of x [B, S, heads*D] over each head's D (heads > 0) or over the whole width (heads 0)."""
    eps = float(g.cfg.rms_norm_eps)
    if not heads:
        return g.op1("SimplifiedLayerNormalization", [x, g.weight(weight)], axis=-1, epsilon=eps)
    view = g.op1("Reshape", [x, g.const("shape", np.array([0, 0, heads, g.cfg.head_dim]))])  # [B, S, heads, D]
    normed = g.op1("SimplifiedLayerNormalization", [view, g.weight(weight)], axis=-1, epsilon=eps)
    return g.op1("Reshape", [normed, g.const("shape", np.array([0, 0, -1]))])


def _separate(g: Builder, pre: str, qkv: str) -> list[str]:
    """q|k|v -> [q, k, v] normed (``qk_norm``) and clipped (``clip_qkv``) as the reference does."""
    cfg = g.cfg
    q, g_, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    sizes = g.const("split", np.array([q * d, g_ * d, g_ * d]))
    parts = g.op("Split", [qkv, sizes], 3, axis=-1)
    if cfg.qk_norm != "none":
        per_head = cfg.qk_norm == "head"
        parts[0] = _rms(g, parts[0], f"{pre}.q_norm.weight", q if per_head else 0)
        parts[1] = _rms(g, parts[1], f"{pre}.k_norm.weight", g_ if per_head else 0)
    if cfg.clip_qkv is not None:
        low, high = g.scalar("clip", -cfg.clip_qkv), g.scalar("clip", cfg.clip_qkv)
        parts = [g.op1("Clip", [p, low, high]) for p in parts]
    return parts


def attention(g: Builder, i: int, h: str) -> str:
    """RMS-normed hidden [B, S, H] -> attention output [B, S, H]; layer i's cache updated in place."""
    cfg, pre = g.cfg, f"layers.{i}.self_attn"
    qkv = _qkv(g, pre, h)
    qkv_in = [qkv, "", ""] if cfg.qk_norm == "none" and cfg.clip_qkv is None else _separate(g, pre, qkv)
    window = cfg.window(i)
    attrs = {} if window is None else {"local_window_size": window}
    sinks = ["", "", g.weight(f"{pre}.sinks")] if cfg.attention_sinks else []  # position_ids, bias, head_sink
    attn = g.op("GroupQueryAttention",
                [*qkv_in, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
                 "total_sequence_length", "cos_cache", "sin_cache", *sinks],
                domain=MS, outputs=[g.name("attn"), f"present.{i}.key", f"present.{i}.value"],
                num_heads=cfg.num_attention_heads, kv_num_heads=cfg.num_key_value_heads,
                do_rotary=1, rotary_interleaved=0, scale=float(cfg.scale), **attrs)[0]
    out = g.matmul(attn, g.proj(f"{pre}.o_proj.weight", [f"{pre}.o_proj.weight"]))
    return g.op1("Add", [out, g.weight(f"{pre}.o_proj.bias")]) if cfg.o_bias else out


def _routes(g: Builder, i: int, flat: str) -> tuple[str, str]:
    """Router logits -> weights [T, k] (graph dtype), ids [T, k]: TopKRouting's one builder."""
    gate = g.names.router_weight(i)
    logits = _logits(g, i, flat)  # [T, E]
    spec, bias = g.cfg.routing(), None
    if spec.bias:  # the selection-only bias, kept fp32 whatever the graph's type (as the export holds it)
        key = gate.removesuffix("weight") + "e_score_correction_bias"
        bias = g.const(key, np.asarray(g.w[key], dtype=np.float32))
    return routing_onnx.routing_nodes(g, logits, spec.k, spec.normalization, g.elem, spec=spec, bias=bias,
                                      num_experts=g.cfg.num_local_experts)


def _logits(g: Builder, i: int, flat: str) -> str:
    """Layer i's router logits [T, E] (+ its bias, ``router_bias``)."""
    gate = g.names.router_weight(i)
    logits = g.matmul(flat, g.proj(gate, [gate]))
    if not g.cfg.router_bias:
        return logits
    return g.op1("Add", [logits, g.weight(gate.removesuffix(".weight") + ".bias")])


def _extension(g: Builder, i: int) -> moe_bodies.Extension | None:
    """Layer i's expert biases ([2F] gate|up, [H] down per expert, from the export's stacks) and the
    activation, when the config has them (a version-"3" MoE node in model.onnx)."""
    cfg = g.cfg
    if not cfg.expert_bias and cfg.expert_activation == "swiglu":
        return None
    prefix = g.names.experts_prefix(i)
    stacked = f"{prefix}.{ops.BIAS_INPUTS[0]}" in g.w  # a fused export's [E, 2F] / [E, H] stacks

    def bias(e: int, role: str) -> np.ndarray:
        return np.asarray(g.w[g.names.expert_weight(i, e, role).removesuffix(".weight") + ".bias"])

    def biases(e: int) -> tuple[str, None, str]:
        if stacked:
            gate_up, down = (np.asarray(g.w[f"{prefix}.{name}"][e]) for name in ops.BIAS_INPUTS)
        else:  # an unfused export's per-expert Linear biases
            gate_up, down = np.concatenate([bias(e, "gate"), bias(e, "up")]), bias(e, "down")
        return g.weight(f"{prefix}.{e}.gate_up.bias", gate_up), None, g.weight(f"{prefix}.{e}.down.bias", down)

    return moe_bodies.Extension(cfg.expert_activation, cfg.swiglu_alpha, cfg.swiglu_limit,
                                biases if cfg.expert_bias else None)


def _mlp(g: Builder, x: str, names: dict[str, str], prefix: str) -> str:
    """One SwiGLU MLP (its gate|up as one MatMul) on x [.., H]; ``names``: role -> weight."""
    gate_up = _gate_up(g, names["gate"], names["up"], f"{prefix}.gate_up.weight")
    return moe_bodies.swiglu_ffn(g, x, gate_up, None, g.proj(names["down"], [names["down"]]), "quickgelu",
                                 g.matmul)


def _shared(g: Builder, i: int, flat: str) -> str:
    """The shared expert on every token [T, H], scaled by sigmoid(x @ gate) when it has a gate."""
    names = {role: g.names.shared_weight(i, role) for role in ("gate", "up", "down")}
    y = _mlp(g, flat, names, names["gate"].rsplit(".", 2)[0])
    if not g.cfg.shared_expert_gate:
        return y
    gate = g.names.shared_weight(i, "shared_gate")
    scale = g.op1("Sigmoid", [g.matmul(flat, g.proj(gate, [gate]))])  # [T, 1]
    return g.op1("Mul", [y, scale])


def _moe(g: Builder, i: int, h: str, shape: str) -> str:
    """Sparse experts over expert-sorted token slots (moe_bodies.ORT_CPU): one gate|up MatMul,
    QuickGelu and one down MatMul per expert on its rows, one scatter-add combine; + the shared expert."""
    cfg = g.cfg
    flat = g.op1("Reshape", [h, g.const("shape", np.array([-1, cfg.hidden_size]))])  # [T, H]
    out = _qmoe(g, i, flat) if g.quantized(g.names.expert_weight(i, 0, "gate")) else None
    if out is not None:
        return g.op1("Reshape", [_with_shared(g, i, flat, out), shape])
    weights, ids = _routes(g, i, flat)

    def slabs(e: int) -> tuple[str, None, str]:
        w1, w3, w2 = (g.names.expert_weight(i, e, role) for role in ("gate", "up", "down"))
        return _gate_up(g, w1, w3, f"{g.names.experts_prefix(i)}.{e}.w13.weight"), None, g.proj(w2, [w2])

    out = moe_bodies.sparse_moe(g, flat, weights, ids, cfg.num_experts_per_tok, cfg.num_local_experts, slabs,
                                moe_bodies.ORT_CPU, g.elem, matmul=g.matmul, ext=_extension(g, i))
    return g.op1("Reshape", [_with_shared(g, i, flat, out), shape])  # [B, S, H]


def _with_shared(g: Builder, i: int, flat: str, out: str) -> str:
    """The routed experts' output [T, H] + the shared expert's, when the layer has one."""
    return g.op1("Add", [out, _shared(g, i, flat)]) if g.cfg.shared_expert_intermediate_size else out


def _qmoe(g: Builder, i: int, flat: str) -> str | None:
    """Layer i's quantized experts as one com.microsoft.QMoE (``ort_qmoe``), routed from the router
    logits by QMoE itself; None when it cannot express them (the sparse body runs them then)."""
    how = ort_qmoe.expressible(g, i)
    if how is None:
        return None
    return ort_qmoe.emit(g, i, flat, _logits(g, i, flat), *how)


def feed_forward(g: Builder, i: int, h: str, shape: str) -> str:
    """Post-attention-normed hidden [B, S, H] -> layer i's MoE block (or dense MLP) output [B, S, H]."""
    if g.cfg.is_sparse(i):
        return _moe(g, i, h, shape)
    names = {role: g.names.dense_weight(i, role) for role in ("gate", "up", "down")}
    return _mlp(g, h, names, names["gate"].rsplit(".", 2)[0])


def rope_cache(g: Builder, exported: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [P, D/2] of the config's rope (plain or YaRN, times its attention factor;
    mixport.models.rope); ``exported``: the export's inv_freq, which must agree."""
    cfg = g.cfg
    inv_freq = rope.inv_freq(cfg)
    if exported is not None and (exported.shape != inv_freq.shape
                                 or not np.allclose(exported, inv_freq, rtol=1e-6, atol=0)):
        raise RuntimeFailure("the export's rotary frequencies (inv_freq) are not those of the config's rope",
                             given=f"inv_freq {exported.ravel()[:3]}...",
                             expected=f"rope {cfg.rope_type}, rope_theta {cfg.rope_theta}: {inv_freq[:3]}...",
                             hint="run with --graph portable")
    freqs = np.arange(cfg.max_position_embeddings, dtype=np.float32)[:, None] * inv_freq  # [P, D/2]
    factor = np.float32(rope.attention_factor(cfg))
    return (np.cos(freqs) * factor).astype(g.dtype), (np.sin(freqs) * factor).astype(g.dtype)


def decoder(g: Builder) -> None:
    """The whole decoder: embeddings, layers (pre-norm attention and feed-forward, the residual adds
    fused into the next norm), final norm, lm_head on the ``logits_index`` rows -> ``logits``."""
    cfg = g.cfg
    eps, residual = float(cfg.rms_norm_eps), cfg.residual_multiplier
    x = g.op1("Gather", [g.weight("embed_tokens.weight"), "input_ids"])  # [B, S, H]
    shape = g.op1("Shape", [x])
    x = g.scaled(x, cfg.embedding_multiplier)
    cos, sin = rope_cache(g, g.w.get("inv_freq"))
    g.weight("cos_cache", cos)
    g.weight("sin_cache", sin)
    out = None  # the previous block's output, added to the residual stream by the next norm
    for i in range(cfg.num_hidden_layers):
        ln1 = g.weight(f"layers.{i}.input_layernorm.weight")
        if out is None:
            h = g.op1("SimplifiedLayerNormalization", [x, ln1], axis=-1, epsilon=eps)
        else:
            h, _, _, x = g.op("SkipSimplifiedLayerNormalization", [out, x, ln1], 4, MS, epsilon=eps)
        attn = g.scaled(attention(g, i, h), residual, "residual")
        ln2 = g.weight(f"layers.{i}.post_attention_layernorm.weight")
        h, _, _, x = g.op("SkipSimplifiedLayerNormalization", [attn, x, ln2], 4, MS, epsilon=eps)
        out = g.scaled(feed_forward(g, i, h, shape), residual, "residual")
    h = g.op("SkipSimplifiedLayerNormalization", [out, x, g.weight("norm.weight")], 4, MS, epsilon=eps)[0]
    flat = g.op1("Reshape", [h, g.const("shape", np.array([-1, cfg.hidden_size]))])  # [B*S, H]
    rows = g.op1("Gather", [flat, "logits_index"])  # [N, H]
    lm = g.proj("lm_head.weight", ["lm_head.weight"])
    if cfg.logits_scaling == 1.0:
        g.matmul(rows, lm, outputs=["logits"])  # [N, V]
    else:
        g.op("Div", [g.matmul(rows, lm), g.scalar("logits_scaling", cfg.logits_scaling)], outputs=["logits"])
