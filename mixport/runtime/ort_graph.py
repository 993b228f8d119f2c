"""The ONNX Runtime CPU decoder graph ("fast" graph), built from an export's weights.

The portable model.onnx runs anywhere but is shaped for tracing: dense experts,
concatenated caches, logits for every position. This graph is the same model
written for ONNX Runtime's CPU kernels, so that a decode step reads each weight
it needs about once:

* q/k/v as one MatMul, gate/up of each expert (and of a shared expert or dense MLP) as one MatMul;
* ``com.microsoft.GroupQueryAttention`` with rotary inside and a fixed-capacity
  cache whose past and present are one buffer (``past_present_share_buffer``);
* residual add + RMSNorm as ``SkipSimplifiedLayerNormalization``;
* sparse experts (``passes.moe_bodies.sparse_moe``, variant ``ORT_CPU``; routing from
  ``exporter.routing_onnx.routing_nodes``: the function bodies' own builders): token
  slots sorted by expert once per layer, each expert runs its two MatMuls on its rows
  (none routed: zero rows, no weight read), one scatter-add combines (measured: same
  speed as per-expert gather/scatter with ~40% fewer nodes; ORT's com.microsoft.MoE was
  slower in both prefill and decode);
* lm_head only on the rows named by ``logits_index`` (the last token of each row);
* no second copy of the weights: big initializers point at model.onnx's bytes (``ort_weights``);
* quantized exports: blocked DequantizeLinear -> MatMul, fused by ONNX Runtime into MatMulNBits at
  load at the session's accuracy level, and one ``com.microsoft.QMoE`` per layer for the routed
  experts (``ort_qmoe``), or the sparse body of MatMulNBits where QMoE cannot express them.

Quantized choices, measured on the mini-Mixtral (hidden 512, intermediate 1792, 4 layers, 8 experts,
top-2, vocab 32000) with ONNX Runtime 1.32 CPU on a loaded 2-core AMD EPYC (AVX-512 VNNI), 1 thread,
64-token prompt, 128 new tokens (``mixport bench --threads 1``; medians, noisy: ratios hold):

* accuracy level (``passes/nbits.ACCURACY_LEVEL`` = 4). Level 0/1 (fp32 activations) is exact to the
  dequantized weights but slow: 8-bit MatMulNBits has no fp32 kernel there (int8: 7.7 tok/s decode,
  450 ms prefill, against 122 tok/s / 46 ms at level 4); int4 decodes 107 vs 127 tok/s and prefills
  84 vs 55 ms (level 0 vs 4, lm_head fp32). Level 4 quantizes activations to int8 per block inside the
  kernel (llama.cpp's q8_0 / q4_0 do the same). Its error, teacher-forced logits of 2 x 96 tokens
  against the fp32 model: int8 rms 0.038 -> 0.055 (max 0.97 -> 1.58; top-1 0.95 -> 0.90), int4 rms
  0.362 -> 0.366 (max 4.19 -> 4.25), int4-zp 0.354 -> 0.355 (logits rms 1.0): +45% on int8's small
  error, +1% on int4's. Chosen: 4 (decode 1.2-20x faster).
* experts: QMoE against one MatMulNBits per expert slab (A/B in one process, level 4): decode 321 vs
  263 tok/s (int4, lm_head int4), 289 vs 230 (int8, lm_head int8), 175 vs 163 (int4, lm_head fp32);
  prefill 15% slower (44 vs 37 ms); session start +0.6 s (its weights were then made at load; since graph
  version 8 they are written with the graph). Chosen: QMoE.
* decode tok/s / prefill ms (``mixport bench --threads 1``): fp32 96 / 51, int8 149 / 42, int4 162 / 43,
  int4-zp 173 / 41, int8 + lm_head 235 / 43, int4 + lm_head 327 / 40. The fp32 lm_head (65 MB of the
  int4 folder's 188) is read every step: ``--quantize-lm-head`` doubles int4's decode.

The layers (``ort_layers``: q/k/v and o biases, q/k norms, clipping, the softmax scale,
per-layer sliding windows, shared experts, dense MLP layers, both routing orders, muP
scalars) are derived from the manifest's config and the family's adapter
(``manifest.config["model_type"]``; a manifest without one is Mixtral's): the adapter says
whether the fast graph can build the family (``Adapter.fast_graph``) and where its weights
sit. It refuses, with a reason, any graph it does not fully understand: an unknown family, a
config field it does not build (``FIELDS``), a head size GroupQueryAttention rejects, or a
weight of the export it would not use.

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
from onnx import TensorProto, external_data_helper, helper

from mixport import artifact, config_fields, ops
from mixport.artifact import Manifest, OrtGraphRecord
from mixport.errors import RuntimeFailure
from mixport.models import Adapter, registry
from mixport.models import config as model_config
from mixport.passes import nbits
from mixport.runtime import onnx_locate, ort_layers, ort_qmoe, ort_weights
from mixport.runtime.ort_emit import MS, Builder, is_weight

GRAPH_VERSION = 8  # 6: quantized exports (MatMulNBits); 7: QMoE scales in model.ort.onnx.scales; 8: all of
# QMoE's inputs in model.ort.onnx.qmoe
FILE = "model.ort.onnx"
SIGNATURE = "ort-cpu-gqa-v1"

# The config fields this builder builds, or that do not change what a decoder computes. Any other
# field (one a newer family added to MoEConfig) must keep its neutral default, else: not supported.
FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "head_dim", "rms_norm_eps",
    "rope_theta", "max_position_embeddings", "sliding_window", "tie_word_embeddings", "normalization",
    "bos_token_id", "eos_token_id", "pad_token_id", "model_type",
    "routing_order", "qkv_bias", "o_bias", "qk_norm", "clip_qkv", "attention_scale", "sliding_layers",
    "shared_expert_intermediate_size", "shared_expert_gate", "dense_layers", "dense_intermediate_size",
    "embedding_multiplier", "residual_multiplier", "logits_scaling",
    "scoring", "n_group", "topk_group", "group_score", "routed_scaling_factor", "selection_bias", "sparsemixer_eps",
    "rope_type", "rope_factor", "rope_original_max", "rope_attention_factor", "rope_beta_fast", "rope_beta_slow",
    "rope_mscale", "rope_mscale_all_dim", "rope_truncate",  # yarn; longrope: see supported()
    "attention_sinks", "router_bias", "expert_bias", "expert_activation", "swiglu_alpha", "swiglu_limit"})  # GPT-OSS
# GroupQueryAttention on ONNX Runtime 1.32's CPU provider, measured (tests/runtime/test_gqa_contract.py):
# head_size % 8 or it refuses to run, and % 16 with do_rotary ("head_size shall be a multiple of 16").
HEAD_DIM_MULTIPLE = 16


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


def model_cfg(cfg: dict[str, Any]) -> model_config.MoEConfig:
    """The manifest's config dict as a MoEConfig (fields it lacks at their neutral defaults)."""
    names = set(model_config.field_names())
    return model_config.MoEConfig(**{k: config_fields.held(k, v) for k, v in cfg.items() if k in names})


def supported(cfg: dict[str, Any], dtype: str) -> str | None:
    """None when the fast graph can express this model (its family, config and dtype), else why
    not. ``build`` also refuses an export with weights it would not use."""
    if dtype not in ("fp32", "fp16"):
        return f"dtype {dtype} (ONNX Runtime CPU runs fp32 / fp16)"
    if cfg.get("kv_lora_rank"):
        return ("MLA attention (kv_lora_rank set): ONNX Runtime's GroupQueryAttention has no multi-head latent "
                "attention (its cache holds the compressed kv, keys and values of other widths)")
    adapter = registry.lookup(cfg.get("model_type"))
    if adapter is None:
        return f"model_type {cfg.get('model_type')!r} (this mixport knows {registry.supported()})"
    if not adapter.fast_graph:
        return f"{adapter.name} (the fast graph does not build this family's modules)"
    if cfg.get("rope_type") == "longrope":
        return ("rope_type longrope (its frequencies switch with the sequence length for the whole call; "
                "GroupQueryAttention's cos/sin cache holds one value per position)")
    defaults = model_config.defaults()
    odd = [f"{k}={v!r}" for k, v in cfg.items()
           if k not in FIELDS and (k not in defaults or config_fields.held(k, v) != defaults[k])]
    if odd:
        return f"config {', '.join(odd)} (the fast graph does not build it)"
    if cfg["head_dim"] % HEAD_DIM_MULTIPLE:
        return (f"head_dim {cfg['head_dim']} (ONNX Runtime's CPU GroupQueryAttention with rotary needs a "
                f"multiple of {HEAD_DIM_MULTIPLE})")
    return None


def _require_supported(cfg: dict[str, Any], dtype: str) -> None:
    why = supported(cfg, dtype)
    if why:
        raise RuntimeFailure("the fast ONNX Runtime graph cannot express this model", given=why,
                             expected=f"fp32/fp16, head_dim a multiple of {HEAD_DIM_MULTIPLE}, a family it builds",
                             hint="run with --graph portable")


def build(weights: dict[str, np.ndarray], cfg: dict[str, Any], dtype: str, share: bool = False,
          accuracy_level: int = nbits.ACCURACY_LEVEL) -> onnx.ModelProto:
    """The fast graph for ``cfg`` from the export's weights (state-dict names, [out, in] layouts;
    quantized ones as ``export_weights`` names them). ``share``: its big weights point at
    model.onnx's bytes (``weights`` from ``export_weights``; the graph must then be saved in
    model.onnx's folder), else every weight is copied into it. ``accuracy_level``: of the QMoE nodes
    (those of MatMulNBits are the session's).
    RuntimeFailure when ``supported`` says no, a weight is missing, or one would be left unused."""
    _require_supported(cfg, dtype)
    np_dtype = np.dtype(np.float16 if dtype == "fp16" else np.float32)
    g = Builder(weights if share else dict(weights), np_dtype, model_cfg(cfg), _adapter(cfg), accuracy_level)
    try:
        ort_layers.decoder(g)
    except KeyError as exc:
        raise RuntimeFailure("the export's weights are not named as the fast graph expects",
                             given=f"missing {exc}", expected="a mixport export (state-dict weight names)",
                             hint="run with --graph portable") from None
    unused = sorted(n for n, v in g.w.items() if n not in g.w.read and is_weight(n, v))
    if unused:
        more = "..." if len(unused) > 3 else ""
        raise RuntimeFailure("the fast ONNX Runtime graph does not understand every weight of this export",
                             given=f"{len(unused)} unused: {', '.join(unused[:3])}{more}",
                             expected=f"only the weights of the {g.names.name} modules it builds",
                             hint="run with --graph portable (model.onnx uses every weight)")
    inputs, outputs = _io(cfg, g.elem)
    graph = helper.make_graph(g.nodes, "mixport_ort_cpu", inputs, outputs, g.inits)
    opset = ops.QUANT_OPSET if g.dequantize else ops.ONNX_OPSET  # blocked DequantizeLinear: opset 21
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                              producer_name="mixport", producer_version=str(GRAPH_VERSION))
    ort_qmoe.record(model, g.qmoe)
    return model


def _adapter(cfg: dict[str, Any] | None) -> Adapter:
    model_type = (cfg or {}).get("model_type")
    adapter = registry.lookup(model_type)
    if adapter is None:
        raise RuntimeFailure("the fast ONNX Runtime graph does not know this model family", given=model_type,
                             expected=registry.supported(), hint="run with --graph portable")
    return adapter


def export_weights(model_path: Path, cfg: dict[str, Any] | None = None) -> ort_weights.Exported:
    """The initializers of an export's model.onnx by state-dict name, stacked experts viewed per
    expert, with where model.onnx holds each one's bytes (``ort_weights.export_weights``);
    ``cfg``: the manifest's config (None: Mixtral's names)."""
    return ort_weights.export_weights(Path(model_path), _adapter(cfg))


def _is_current(folder: Path, record: OrtGraphRecord | None, source_sha: str) -> bool:
    path = folder / FILE
    return (record is not None and record.version == GRAPH_VERSION
            and record.source_onnx_sha256 == source_sha and path.is_file()
            and artifact.verify(path, record.sha256, record.stamp) is not None
            and ort_qmoe.parts_ready(folder, ort_qmoe.parts_of(onnx_locate.skeleton(path))))


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
    proto = build(export_weights(folder / artifact.MODEL_FILE, cfg), cfg, manifest.dtype, share=True)
    written = _write(folder, proto, source_sha)
    if manifest.ort_graph is not None and manifest.ort_graph.version == 7:  # its scales file: ours, now unused
        (folder / ort_qmoe.OLD_PARTS).unlink(missing_ok=True)
    return written


def _save(proto: onnx.ModelProto, path: Path, folder: Path | None = None) -> list[str]:
    """Write PATH and, beside it, QMoE's inputs (``ort_qmoe.PARTS``, made from FOLDER's model.onnx:
    PATH's folder unless given); initializers that point at model.onnx's bytes stay pointers (never
    copied), the others go inline, or to PATH.data when the graph would pass protobuf's 2 GB limit."""
    ort_qmoe.write_parts(Path(folder or Path(path).parent), ort_qmoe.parts_of(proto),
                         Path(path).with_name(ort_qmoe.PARTS))
    if not any(external_data_helper.uses_external_data(t) for t in proto.graph.initializer):
        return artifact.save_onnx(proto, path)
    if proto.ByteSize() < artifact.TWO_GB:
        onnx.save_model(proto, str(path))
        return [path.name]
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)
    return [path.name, f"{path.name}.data"]


def _write(folder: Path, proto: onnx.ModelProto, source_sha: str) -> Path:
    try:
        with artifact.atomic_write(folder / FILE) as tmp:  # its companions (FILE.*) are renamed with it
            files = _save(proto, tmp, folder)
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
