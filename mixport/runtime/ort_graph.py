"""The ONNX Runtime CPU decoder graph ("fast" graph), built from an export's weights.

The portable model.onnx runs anywhere but is shaped for tracing: dense experts,
concatenated caches, logits for every position. This graph is the same model
written for ONNX Runtime's CPU kernels, so that a decode step reads each weight
it needs about once:

* q/k/v as one MatMul, gate/up of each expert as one MatMul;
* ``com.microsoft.GroupQueryAttention`` with rotary inside and a fixed-capacity
  cache whose past and present are one buffer (``past_present_share_buffer``);
* residual add + RMSNorm as ``SkipSimplifiedLayerNormalization``;
* sparse experts (``passes.moe_bodies.sparse_moe``, variant ``ORT_CPU``; routing from
  ``exporter.routing_onnx.routing_nodes``: the function bodies' own builders): token
  slots sorted by expert once per layer, each expert runs its two MatMuls on its rows
  (none routed: zero rows, no weight read), one scatter-add combines (measured: same
  speed as per-expert gather/scatter with ~40% fewer nodes; ORT's com.microsoft.MoE was
  slower in both prefill and decode);
* lm_head only on the rows named by ``logits_index`` (the last token of each row).

What it builds is derived from the family's adapter (``manifest.config["model_type"]``;
a manifest without one is Mixtral's): the adapter says whether the fast graph can build
the family (``Adapter.fast_graph``) and where the router and expert weights sit. It refuses,
with a reason, any graph it does not fully understand: an unknown family, a config field
it does not build, or a weight of the export it would not use (a shared expert, a bias).

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

from mixport import artifact, onnx_io
from mixport.artifact import Manifest, OrtGraphRecord
from mixport.errors import RuntimeFailure
from mixport.exporter import routing_onnx
from mixport.models import Adapter, registry
from mixport.models import config as model_config
from mixport.passes import moe_bodies

GRAPH_VERSION = 5
FILE = "model.ort.onnx"
SIGNATURE = "ort-cpu-gqa-v1"
MS = "com.microsoft"

# T tokens (B*S), H hidden, E experts, k active, F intermediate, V vocab

# The config fields this builder reads, or that do not change what a decoder computes. Any other
# field (one a newer family added to MoEConfig) must keep its neutral default, else: not supported.
FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "head_dim", "rms_norm_eps",
    "rope_theta", "max_position_embeddings", "sliding_window", "tie_word_embeddings", "normalization",
    "bos_token_id", "eos_token_id", "pad_token_id", "model_type"})


class _Reads(dict):
    """The export's weights by name; remembers which ones the builder read."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        super().__init__(weights)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> np.ndarray:
        value = super().__getitem__(key)
        self.read.add(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def _is_weight(name: str, value: np.ndarray) -> bool:
    """A weight of the model, which the fast graph must build from, rather than a constant of
    the traced graph it re-expresses (a scalar: eps, scale, mask value; an int64 shape/axes
    vector): a state-dict (dotted) name, or any other tensor."""
    return "." in name or (value.ndim > 0 and not (value.ndim == 1 and value.dtype == np.int64))


class _Builder:
    """Nodes and initializers with unique names; ``names``: the family's adapter (weight names)."""

    def __init__(self, weights: dict[str, np.ndarray], dtype: np.dtype, names: Adapter) -> None:
        self.w, self.dtype, self.names = _Reads(weights), dtype, names
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


def _routes(g: _Builder, cfg: dict[str, Any], i: int, flat: str) -> tuple[str, str]:
    """Router logits -> weights [T, k] (graph dtype), ids [T, k]: TopKRouting's one builder."""
    gate = g.names.router_weight(i)
    logits = g.op1("MatMul", [flat, g.weight(gate, g.w[gate].T)])  # [T, E]
    return routing_onnx.routing_nodes(g, logits, cfg["num_experts_per_tok"], cfg.get("normalization", "renormalize"),
                                      helper.np_dtype_to_tensor_dtype(g.dtype))


def _moe(g: _Builder, cfg: dict[str, Any], i: int, h: str, shape: str) -> str:
    """Sparse experts over expert-sorted token slots (moe_bodies.ORT_CPU): one gate|up MatMul,
    QuickGelu and one down MatMul per expert on its rows, one scatter-add combine."""
    flat = g.op1("Reshape", [h, g.const("shape", np.array([-1, cfg["hidden_size"]]))])  # [T, H]
    weights, ids = _routes(g, cfg, i, flat)

    def slabs(e: int) -> tuple[str, None, str]:
        pre = f"{g.names.experts_prefix(i)}.{e}"
        w1, w3, w2 = (g.names.expert_weight(i, e, role) for role in ("gate", "up", "down"))
        gate_up = np.concatenate([g.w[w1].T, g.w[w3].T], axis=1)  # [H, 2F]
        return g.weight(f"{pre}.w13.weight", gate_up), None, g.weight(w2, g.w[w2].T)

    out = moe_bodies.sparse_moe(g, flat, weights, ids, cfg["num_experts_per_tok"], cfg["num_local_experts"], slabs,
                                moe_bodies.ORT_CPU, helper.np_dtype_to_tensor_dtype(g.dtype))
    return g.op1("Reshape", [out, shape])  # [B, S, H]


def _rope_cache(cfg: dict[str, Any], dtype: np.dtype, exported: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [P, D/2] of plain RoPE; ``exported``: the export's inv_freq, which must agree."""
    d = cfg["head_dim"]
    inv_freq = 1.0 / (cfg["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float32) / d))
    if exported is not None and (exported.shape != inv_freq.shape
                                 or not np.allclose(exported, inv_freq, rtol=1e-6, atol=0)):
        raise RuntimeFailure("the export's rotary frequencies (inv_freq) are not plain RoPE of the config",
                             given=f"inv_freq {exported.ravel()[:3]}...",
                             expected=f"rope_theta {cfg['rope_theta']}: {inv_freq[:3]}...",
                             hint="run with --graph portable")
    freqs = np.arange(cfg["max_position_embeddings"], dtype=np.float32)[:, None] * inv_freq  # [P, D/2]
    return np.cos(freqs).astype(dtype), np.sin(freqs).astype(dtype)


def _decoder(g: _Builder, cfg: dict[str, Any]) -> None:
    eps = float(cfg["rms_norm_eps"])
    x = g.op1("Gather", [g.weight("embed_tokens.weight"), "input_ids"])  # [B, S, H]
    shape = g.op1("Shape", [x])
    cos, sin = _rope_cache(cfg, g.dtype, g.w.get("inv_freq"))
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
    """None when the fast graph can express this model (its family, config and dtype), else why
    not. ``build`` also refuses an export with weights it would not use."""
    if dtype not in ("fp32", "fp16"):
        return f"dtype {dtype} (ONNX Runtime CPU runs fp32 / fp16)"
    adapter = registry.lookup(cfg.get("model_type"))
    if adapter is None:
        return f"model_type {cfg.get('model_type')!r} (this mixport knows {registry.supported()})"
    if not adapter.fast_graph:
        return f"{adapter.name} (the fast graph does not build this family's modules)"
    defaults = model_config.defaults()
    odd = [f"{k}={v!r}" for k, v in cfg.items() if k not in FIELDS and (k not in defaults or v != defaults[k])]
    if odd:
        return f"config {', '.join(odd)} (the fast graph does not build it)"
    if cfg["head_dim"] % 8:
        return f"head_dim {cfg['head_dim']} (GroupQueryAttention wants a multiple of 8)"
    window = cfg.get("sliding_window")
    if window is not None and window < cfg["max_position_embeddings"]:
        return f"sliding_window {window} < context"
    return None


def _require_supported(cfg: dict[str, Any], dtype: str) -> None:
    why = supported(cfg, dtype)
    if why:
        raise RuntimeFailure("the fast ONNX Runtime graph cannot express this model", given=why,
                             expected="fp32/fp16, no sliding window, a family it builds",
                             hint="run with --graph portable")


def build(weights: dict[str, np.ndarray], cfg: dict[str, Any], dtype: str) -> onnx.ModelProto:
    """The fast graph for ``cfg`` from the export's weights (state-dict names, [out, in] layouts).
    RuntimeFailure when ``supported`` says no, a weight is missing, or one would be left unused."""
    _require_supported(cfg, dtype)
    np_dtype = np.dtype(np.float16 if dtype == "fp16" else np.float32)
    g = _Builder(weights, np_dtype, _adapter(cfg))
    try:
        _decoder(g, cfg)
    except KeyError as exc:
        raise RuntimeFailure("the export's weights are not named as the fast graph expects",
                             given=f"missing {exc}", expected="a mixport export (state-dict weight names)",
                             hint="run with --graph portable") from None
    unused = sorted(n for n, v in g.w.items() if n not in g.w.read and _is_weight(n, v))
    if unused:
        more = "..." if len(unused) > 3 else ""
        raise RuntimeFailure("the fast ONNX Runtime graph does not understand every weight of this export",
                             given=f"{len(unused)} unused: {', '.join(unused[:3])}{more}",
                             expected=f"only the weights of the {g.names.name} modules it builds",
                             hint="run with --graph portable (model.onnx uses every weight)")
    elem = helper.np_dtype_to_tensor_dtype(np_dtype)
    inputs, outputs = _io(cfg, elem)
    graph = helper.make_graph(g.nodes, "mixport_ort_cpu", inputs, outputs, g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)],
                             producer_name="mixport", producer_version=str(GRAPH_VERSION))


def _adapter(cfg: dict[str, Any] | None) -> Adapter:
    model_type = (cfg or {}).get("model_type")
    adapter = registry.lookup(model_type)
    if adapter is None:
        raise RuntimeFailure("the fast ONNX Runtime graph does not know this model family", given=model_type,
                             expected=registry.supported(), hint="run with --graph portable")
    return adapter


def export_weights(model_path: Path, cfg: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The initializers of an export's model.onnx by state-dict name (external data resolved);
    a fused export's stacked experts (the fusion pass names them ``<experts>.gate_up`` /
    ``.down``) are viewed as the per-expert gate/up/down [out, in] slabs the adapter names.
    ``cfg``: the manifest's config (None: Mixtral's names)."""
    names = _adapter(cfg)
    onnx_io.check_external_locations(model_path)  # before onnx reads any external data
    proto = onnx.load(str(model_path))
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for i in range(_layer_count(weights)):
        base = names.experts_prefix(i)
        if f"{base}.gate_up" not in weights:
            continue
        gate_up, down = weights.pop(f"{base}.gate_up"), weights.pop(f"{base}.down")  # [E, H, 2F], [E, F, H]
        f = down.shape[1]
        for e in range(gate_up.shape[0]):
            weights[names.expert_weight(i, e, "gate")] = gate_up[e, :, :f].T
            weights[names.expert_weight(i, e, "up")] = gate_up[e, :, f:].T
            weights[names.expert_weight(i, e, "down")] = down[e].T
    return weights


def _layer_count(weights: dict[str, np.ndarray]) -> int:
    layers = {int(n.split(".")[1]) for n in weights if n.startswith("layers.") and n.split(".")[1].isdigit()}
    return max(layers, default=-1) + 1


def _is_current(folder: Path, record: OrtGraphRecord | None, source_sha: str) -> bool:
    path = folder / FILE
    return (record is not None and record.version == GRAPH_VERSION
            and record.source_onnx_sha256 == source_sha and path.is_file()
            and artifact.verify(path, record.sha256, record.stamp) is not None)


def ensure(folder: Path, manifest: Manifest, progress: Any = None) -> Path:
    """FOLDER/model.ort.onnx, built on first use (and again when model.onnx changed);
    recorded in the manifest as ``ort_graph`` {file, version, signature, sha256, source}."""
    folder = Path(folder)
    _require_supported(manifest.config, manifest.dtype)
    source_sha = manifest.onnx_sha256 or artifact.file_sha256(folder / artifact.MODEL_FILE)
    if _is_current(folder, manifest.ort_graph, source_sha):
        return folder / FILE
    if progress:
        progress("building the ONNX Runtime CPU graph (once per export folder)")
    cfg = manifest.config
    proto = build(export_weights(folder / artifact.MODEL_FILE, cfg), cfg, manifest.dtype)
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
