"""The ONNX Runtime CPU decoder graph ("fast" graph), built from an export's weights.

The portable model.onnx runs anywhere but is shaped for tracing: dense experts,
concatenated caches, logits for every position. This graph is the same model
written for ONNX Runtime's CPU kernels, so that a decode step reads each weight
it needs about once:

* q/k/v as one MatMul, gate/up of each expert as one MatMul;
* ``com.microsoft.GroupQueryAttention`` with rotary inside and a fixed-capacity
  cache whose past and present are one buffer (``past_present_share_buffer``);
* residual add + RMSNorm as ``SkipSimplifiedLayerNormalization``;
* sparse experts: token slots sorted by expert once per layer, each expert runs
  its two MatMuls on its slice (none routed: zero rows, no weight read), one
  scatter-add combines (measured: same speed as per-expert gather/scatter with
  ~40% fewer nodes; ORT's com.microsoft.MoE was slower in both prefill and decode);
* lm_head only on the rows named by ``logits_index`` (the last token of each row).

Signature (B batch, S new tokens, C cache capacity, G kv heads, D head dim, N rows):
input_ids [B, S] int64 (right-padded), seqlens_k [B] int32 (tokens in cache after
this step - 1), total_sequence_length [] int32, logits_index [N] int64 (flat
indices into B*S), past_key_values.{i}.key/value [B, G, C, D] ->
logits [N, V], present.{i}.key/value [B, G, C, D] (same buffers as past).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mixport import artifact
from mixport.artifact import Manifest, OrtGraphRecord
from mixport.errors import RuntimeFailure

GRAPH_VERSION = 5
FILE = "model.ort.onnx"
SIGNATURE = "ort-cpu-gqa-v1"
MS = "com.microsoft"

# T tokens (B*S), H hidden, E experts, k active, F intermediate, V vocab


class _Builder:
    """Nodes and initializers with unique names."""

    def __init__(self, weights: dict[str, np.ndarray], dtype: np.dtype) -> None:
        self.w, self.dtype = weights, dtype
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, order="C"), name))
        return name

    def weight(self, key: str, value: np.ndarray | None = None) -> str:
        """An initializer named ``key`` (value: the export's tensor of that name unless given)."""
        arr = self.w[key] if value is None else value
        self.inits.append(numpy_helper.from_array(np.asarray(arr, dtype=self.dtype, order="C"), key))
        return key

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "",
           outputs: list[str] | None = None, **attrs: Any) -> list[str]:
        outs = outputs or [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), domain=domain,
                                           **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], domain: str = "", **attrs: Any) -> str:
        return self.op(op_type, inputs, 1, domain, **attrs)[0]


def _attention(g: _Builder, cfg: dict[str, Any], i: int, h: str) -> str:
    """RMS-normed hidden [B, S, H] -> attention output [B, S, H]; cache updated in place."""
    pre = f"layers.{i}.self_attn"
    qkv_w = np.concatenate([g.w[f"{pre}.{p}_proj.weight"].T for p in "qkv"], axis=1)  # [H, (Q+2G)*D]
    qkv = g.op1("MatMul", [h, g.weight(f"{pre}.qkv_proj.weight", qkv_w)])
    attn = g.op("GroupQueryAttention",
                [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
                 "total_sequence_length", "cos_cache", "sin_cache"],
                domain=MS, outputs=[g.name("attn"), f"present.{i}.key", f"present.{i}.value"],
                num_heads=cfg["num_attention_heads"], kv_num_heads=cfg["num_key_value_heads"],
                do_rotary=1, rotary_interleaved=0, scale=float(cfg["head_dim"]) ** -0.5)[0]
    return g.op1("MatMul", [attn, g.weight(f"{pre}.o_proj.weight", g.w[f"{pre}.o_proj.weight"].T)])


def _routes(g: _Builder, cfg: dict[str, Any], i: int, flat: str) -> tuple[str, str, str, list[str]]:
    """Token slots sorted by expert: token ids [T*k], weights [T*k, 1], x rows [T*k, H], and
    the E+1 slice bounds [1] of each expert's run in that order."""
    gate = f"layers.{i}.block_sparse_moe.gate.weight"
    e_n, k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
    logits = g.op1("MatMul", [flat, g.weight(gate, g.w[gate].T)])  # [T, E]
    if g.dtype != np.float32:  # routing in fp32, as the reference does
        logits = g.op1("Cast", [logits], to=TensorProto.FLOAT)
    kk = g.const("k", np.array([k], dtype=np.int64))
    if cfg.get("normalization", "renormalize") == "renormalize":  # softmax of the top-k logits
        top, ids = g.op("TopK", [logits, kk], 2, axis=-1)  # = top-k probs renormalized
        top = g.op1("Softmax", [top], axis=-1)  # [T, k]
    else:
        top, ids = g.op("TopK", [g.op1("Softmax", [logits], axis=-1), kk], 2, axis=-1)
    key = g.op1("Reshape", [ids, g.const("shape", np.array([-1]))])  # [T*k] expert of each slot
    _, order = g.op("TopK", [key, g.op1("Shape", [key])], 2, axis=-1, largest=0, sorted=1)  # by expert
    token = g.op1("Div", [order, g.const("k", np.array(k, dtype=np.int64))])  # [T*k]
    weight = g.op1("Gather", [g.op1("Reshape", [top, g.const("shape", np.array([-1, 1]))]), order])  # [T*k, 1]
    if g.dtype != np.float32:
        weight = g.op1("Cast", [weight], to=helper.np_dtype_to_tensor_dtype(g.dtype))
    below = g.op1("LessOrEqual", [g.op1("Unsqueeze", [key, g.const("ax", np.array([1]))]),
                                  g.const("experts", np.arange(e_n, dtype=np.int64))])  # [T*k, E]
    ends = g.op1("ReduceSum", [g.op1("Cast", [below], to=TensorProto.INT64), g.const("ax", np.array([0]))],
                 keepdims=0)  # [E]: slots of experts <= e
    bounds = g.op1("Concat", [g.const("zero", np.array([0])), ends], axis=0)  # [E+1]
    return token, weight, g.op1("Gather", [flat, token], axis=0), g.op("Split", [bounds], e_n + 1, axis=0,
                                                                         num_outputs=e_n + 1)


def _moe(g: _Builder, cfg: dict[str, Any], i: int, h: str, shape: str) -> str:
    """Sparse experts over expert-sorted token slots: one slice and two MatMuls per expert."""
    flat = g.op1("Reshape", [h, g.const("shape", np.array([-1, cfg["hidden_size"]]))])  # [T, H]
    token, weight, xs, bounds = _routes(g, cfg, i, flat)
    ax0 = g.const("ax", np.array([0]))
    outs = []
    for e in range(cfg["num_local_experts"]):
        pre = f"layers.{i}.block_sparse_moe.experts.{e}"
        x = g.op1("Slice", [xs, bounds[e], bounds[e + 1], ax0])  # [N_e, H]
        gate_up = np.concatenate([g.w[f"{pre}.w1.weight"].T, g.w[f"{pre}.w3.weight"].T], axis=1)  # [H, 2F]
        gate, up = g.op("Split", [g.op1("MatMul", [x, g.weight(f"{pre}.w13.weight", gate_up)])], 2, axis=-1,
                        num_outputs=2)
        act = g.op1("Mul", [g.op1("QuickGelu", [gate], domain=MS, alpha=1.0), up])  # silu(gate) * up
        outs.append(g.op1("MatMul", [act, g.weight(f"{pre}.w2.weight", g.w[f"{pre}.w2.weight"].T)]))
    y = g.op1("Mul", [g.op1("Concat", outs, axis=0), weight])  # [T*k, H], expert-sorted
    zeros = g.op1("Mul", [flat, g.const("zero", np.zeros((), g.dtype))])
    idx = g.op1("Unsqueeze", [token, g.const("ax", np.array([1]))])
    if g.dtype != np.float32:  # ORT's CPU ScatterND adds only fp32: combine in fp32
        y, zeros = (g.op1("Cast", [t], to=TensorProto.FLOAT) for t in (y, zeros))
    out = g.op1("ScatterND", [zeros, idx, y], reduction="add")
    if g.dtype != np.float32:
        out = g.op1("Cast", [out], to=helper.np_dtype_to_tensor_dtype(g.dtype))
    return g.op1("Reshape", [out, shape])  # [B, S, H]


def _rope_cache(cfg: dict[str, Any], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    d = cfg["head_dim"]
    inv_freq = 1.0 / (cfg["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float32) / d))
    freqs = np.arange(cfg["max_position_embeddings"], dtype=np.float32)[:, None] * inv_freq  # [P, D/2]
    return np.cos(freqs).astype(dtype), np.sin(freqs).astype(dtype)


def _decoder(g: _Builder, cfg: dict[str, Any]) -> None:
    eps = float(cfg["rms_norm_eps"])
    x = g.op1("Gather", [g.weight("embed_tokens.weight"), "input_ids"])  # [B, S, H]
    shape = g.op1("Shape", [x])
    cos, sin = _rope_cache(cfg, g.dtype)
    g.weight("cos_cache", cos)
    g.weight("sin_cache", sin)
    moe_out = None
    for i in range(cfg["num_hidden_layers"]):
        ln1 = g.weight(f"layers.{i}.input_layernorm.weight")
        if moe_out is None:
            h = g.op1("SimplifiedLayerNormalization", [x, ln1], axis=-1, epsilon=eps)
        else:
            h, _, _, x = g.op("SkipSimplifiedLayerNormalization", [moe_out, x, ln1], 4, MS, epsilon=eps)
        attn = _attention(g, cfg, i, h)
        ln2 = g.weight(f"layers.{i}.post_attention_layernorm.weight")
        h, _, _, x = g.op("SkipSimplifiedLayerNormalization", [attn, x, ln2], 4, MS, epsilon=eps)
        moe_out = _moe(g, cfg, i, h, shape)
    h = g.op("SkipSimplifiedLayerNormalization", [moe_out, x, g.weight("norm.weight")], 4, MS,
             epsilon=eps)[0]
    flat = g.op1("Reshape", [h, g.const("shape", np.array([-1, cfg["hidden_size"]]))])  # [B*S, H]
    rows = g.op1("Gather", [flat, "logits_index"])  # [N, H]
    lm = g.weight("lm_head.weight", g.w["lm_head.weight"].T)
    g.op("MatMul", [rows, lm], outputs=["logits"])  # [N, V]


def _io(cfg: dict[str, Any], elem: int) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    vi = helper.make_tensor_value_info
    g, d = cfg["num_key_value_heads"], cfg["head_dim"]
    cache = ["batch", g, "capacity", d]
    inputs = [vi("input_ids", TensorProto.INT64, ["batch", "seq"]),
              vi("seqlens_k", TensorProto.INT32, ["batch"]),
              vi("total_sequence_length", TensorProto.INT32, []),
              vi("logits_index", TensorProto.INT64, ["rows"])]
    outputs = [vi("logits", elem, ["rows", cfg["vocab_size"]])]
    for i in range(cfg["num_hidden_layers"]):
        for kv in ("key", "value"):
            inputs.append(vi(f"past_key_values.{i}.{kv}", elem, cache))
            outputs.append(vi(f"present.{i}.{kv}", elem, cache))
    return inputs, outputs


def supported(cfg: dict[str, Any], dtype: str) -> str | None:
    """None when the fast graph can express this model, else why not."""
    if dtype not in ("fp32", "fp16"):
        return f"dtype {dtype} (ONNX Runtime CPU runs fp32 / fp16)"
    if cfg["head_dim"] % 8:
        return f"head_dim {cfg['head_dim']} (GroupQueryAttention wants a multiple of 8)"
    window = cfg.get("sliding_window")
    if window is not None and window < cfg["max_position_embeddings"]:
        return f"sliding_window {window} < context"
    return None


def build(weights: dict[str, np.ndarray], cfg: dict[str, Any], dtype: str) -> onnx.ModelProto:
    """The fast graph for ``cfg`` from the export's weights (state-dict names, [out, in] layouts)."""
    np_dtype = np.dtype(np.float16 if dtype == "fp16" else np.float32)
    g = _Builder(weights, np_dtype)
    try:
        _decoder(g, cfg)
    except KeyError as exc:
        raise RuntimeFailure("the export's weights are not named as the fast graph expects",
                             given=f"missing {exc}", expected="a mixport export (state-dict weight names)",
                             hint="run with --graph portable") from None
    elem = helper.np_dtype_to_tensor_dtype(np_dtype)
    inputs, outputs = _io(cfg, elem)
    graph = helper.make_graph(g.nodes, "mixport_ort_cpu", inputs, outputs, g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)],
                             producer_name="mixport", producer_version=str(GRAPH_VERSION))


def export_weights(model_path: Path) -> dict[str, np.ndarray]:
    """The initializers of an export's model.onnx by state-dict name (external data resolved);
    a fused export's stacked experts are viewed as the per-expert w1/w3/w2 [out, in] slabs."""
    proto = onnx.load(str(model_path))
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for name in [n for n in weights if n.endswith(".experts.gate_up")]:
        base = name.removesuffix(".gate_up")
        gate_up, down = weights.pop(name), weights.pop(f"{base}.down")  # [E, H, 2F], [E, F, H]
        f = down.shape[1]
        for e in range(gate_up.shape[0]):
            weights[f"{base}.{e}.w1.weight"] = gate_up[e, :, :f].T
            weights[f"{base}.{e}.w3.weight"] = gate_up[e, :, f:].T
            weights[f"{base}.{e}.w2.weight"] = down[e].T
    return weights


def _is_current(folder: Path, record: OrtGraphRecord | None, source_sha: str) -> bool:
    path = folder / FILE
    return (record is not None and record.version == GRAPH_VERSION
            and record.source_onnx_sha256 == source_sha and path.is_file()
            and artifact.verify(path, record.sha256, record.stamp) is not None)


def ensure(folder: Path, manifest: Manifest, progress: Any = None) -> Path:
    """FOLDER/model.ort.onnx, built on first use (and again when model.onnx changed);
    recorded in the manifest as ``ort_graph`` {file, version, signature, sha256, source}."""
    folder = Path(folder)
    why = supported(manifest.config, manifest.dtype)
    if why:
        raise RuntimeFailure("the fast ONNX Runtime graph cannot express this model", given=why,
                             expected="fp32/fp16, no sliding window", hint="run with --graph portable")
    source_sha = manifest.onnx_sha256 or artifact.file_sha256(folder / artifact.MODEL_FILE)
    if _is_current(folder, manifest.ort_graph, source_sha):
        return folder / FILE
    if progress:
        progress("building the ONNX Runtime CPU graph (once per export folder)")
    proto = build(export_weights(folder / artifact.MODEL_FILE), manifest.config, manifest.dtype)
    return _write(folder, proto, source_sha)


def _write(folder: Path, proto: onnx.ModelProto, source_sha: str) -> Path:
    try:
        with artifact.atomic_write(folder / FILE) as tmp:
            files = artifact.save_onnx(proto, tmp)
    except OSError as exc:
        raise RuntimeFailure("cannot write the fast graph into the export folder", given=str(exc),
                             expected="a writable folder", hint="run with --graph portable") from None
    stamp = artifact.stamp(folder / FILE)
    record = OrtGraphRecord(file=FILE, version=GRAPH_VERSION, signature=SIGNATURE, sha256=stamp.sha256,
                            source_onnx_sha256=source_sha, external_data=len(files) > 1, bytes=stamp.bytes,
                            mtime_ns=stamp.mtime_ns)
    manifest = Manifest.read(folder)  # as it is now, not as it was when ensure() began
    dataclasses.replace(manifest, ort_graph=record).write(folder)
    return folder / FILE
