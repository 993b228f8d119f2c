"""``mixport check`` on a quantized folder: the fp32 PyTorch reference vs the quantized model.

``run_quant_check`` measures what ``quant_metrics`` defines (logit error, top-1, greedy and expert
agreement, perplexity with a text) for ONNX Runtime on model.onnx and for the fast ONNX Runtime
graph, and judges it by ``quant_metrics.LIMITS``; ``format_quant_report`` prints one table;
``quant_summary`` is the lines ``mixport export --quantize`` prints at its end.

``dequantize_reference`` is the other comparison (``mixport check --reference dequantized``): the
reference model's weights replaced by quantize -> dequantize of the source weights under the
folder's scheme (``mixport/quant.py``), so that the fp32 check's tolerances apply and only
*implementation* error is left (quantization error and implementation error kept apart).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mixport.artifact import Manifest, QuantRecord
from mixport.errors import MixportError
from mixport.models import registry
from mixport.runtime import memory
from mixport.tools import check, check_target
from mixport.tools import quant_metrics as qe

if TYPE_CHECKING:
    from mixport.models.components import DecoderModel

FAST = "fast ORT graph"
# ONNX Runtime fuses DequantizeLinear -> MatMul into MatMulNBits, by default with int8 activations (accuracy
# level 4: ~0.08 of the logit scale on the tiny model); level 1 keeps fp32 activations: model.onnx exactly
EXACT_QDQ = ("session.qdq_matmulnbits_accuracy_level", "1")
DEQUANTIZED_ONLY = ("--reference dequantized checks model.onnx's exactness alone (fp32 activations); the fast "
                    "graph and TensorRT are measured by `mixport check` without it")


def is_quantized(folder: Path) -> bool:
    return Manifest.read(Path(folder)).quantization is not None


def run_quant_check(folder: Path, *, steps: int = 8, prefer_transformers: bool = True, seed: int = 0,
                    onnx_path: Path | None = None, text: Path | None = None) -> qe.QuantReport:
    """Measure FOLDER's quantization error against its fp32 source model (see ``quant_metrics``)."""
    folder = Path(folder)
    manifest = Manifest.read(folder)
    record = qe.require_quantized(manifest, folder)
    scheme, limits = qe.limits_for(record)
    context = _context(manifest)
    prompt_len = max(1, min(qe.QUANT_PROMPT_LEN, context - steps)) if context else qe.QUANT_PROMPT_LEN
    check_target.require_steps(manifest, steps, prompt_len)
    target = check_target.resolve(folder, manifest, onnx_path)
    check._require_runnable(manifest.dtype)
    _require_memory(target.path, record)
    text_ids = qe.text_tokens(folder, text, context or 1 << 30) if text is not None else None

    from mixport.exporter.export import resolve_source

    src_info = manifest.source
    with resolve_source(Path(src_info.path) if src_info.path else None, src_info.builtin) as (src, _), \
            tempfile.TemporaryDirectory(prefix="mixport-check-") as tmp:
        ref = _reference(src, manifest, target, record, (prompt_len, steps, seed), prefer_transformers, text_ids)
        report = qe.QuantReport(scheme, record, limits, ref.name, ref_tokens=ref.tokens, notes=list(target.notes),
                                text=str(text) if text is not None else None,
                                text_tokens=len(text_ids) if text_ids else 0, ref_perplexity=ref.perplexity)
        report.dense_layers = ref.dense_layers
        report.backends.append(_measure_ort(check.debug_model(target.path, Path(tmp)), target.path, manifest, ref,
                                            text_ids, steps))
        report.backends.append(_measure_fast(folder, manifest, target, ref, text_ids, steps))
        report.notes.append("TensorRT not compared: the quantization error is measured on ONNX Runtime")
    return report


@dataclass
class _Reference:
    """What the backends are measured against."""

    name: str
    prompt: list[int]
    tokens: list[int]  # the fp32 reference's free-running greedy tokens after the prompt
    out: dict[str, np.ndarray]  # fp32 reference outputs over prompt + tokens (one prefill)
    dequantized_logits: np.ndarray  # the dequantized reference's logits over the same positions
    routers: tuple[list[int], int]  # the decoder layers with a router, k
    dense_layers: list[int]
    perplexity: float | None

    @property
    def sequence(self) -> list[int]:
        return self.prompt + self.tokens


def _reference(src: Path, manifest: Manifest, target: check_target.CheckTarget, record: QuantRecord,
               run: tuple[int, int, int], prefer_transformers: bool, text_ids: list[int] | None) -> _Reference:
    """The fp32 reference's outputs (transformers' or mixport's), then the same model's logits on
    quantize -> dequantize weights (mixport's, changed in place)."""
    from mixport.exporter.loader import load_reference

    prompt_len, steps, seed = run
    model, cfg, _ = load_reference(src, "fp32")
    check._require_family(manifest, cfg, src)
    moe_layers = registry.for_config(cfg).moe_layers(cfg)
    check._require_routers(target, len(moe_layers))
    prompt = np.random.default_rng(seed).integers(3, cfg.vocab_size, prompt_len).tolist()
    tokens = check.reference_feeds(model, prompt, steps - 1)[1] if steps else []
    empty = [p.numpy() for p in model.empty_past(1)]
    runner = check.torch_runner(src, model, prefer_transformers)
    with runner:
        out = _whole(runner.infer, prompt + tokens, empty)
        ppl = qe.perplexity(runner.infer, text_ids, empty) if text_ids else None
    dequantize_reference(model, record)
    from mixport.tools.torch_runners import ReferenceRunner

    with ReferenceRunner(model) as deq:
        dequantized = _whole(deq.infer, prompt + tokens, empty)["logits"]
    dense = [i for i in range(cfg.num_hidden_layers) if i not in moe_layers]
    return _Reference(runner.name, prompt, tokens, out, dequantized, (moe_layers, cfg.num_experts_per_tok), dense,
                      ppl)


def _context(manifest: Manifest) -> int | None:
    context = manifest.config.get("max_position_embeddings")
    return context if isinstance(context, int) and not isinstance(context, bool) and context > 0 else None


def _whole(infer: qe.Infer, sequence: list[int], empty: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Every output for ``sequence`` in one prefill."""
    return next(qe.run_sequence(infer, sequence, empty, len(sequence)))[1]


def _measure_ort(debug: Path, model_path: Path, manifest: Manifest, ref: _Reference, text_ids: list[int] | None,
                 steps: int) -> qe.BackendStat:
    """ONNX Runtime on the checked file (opened as `mixport run` opens it), routing ids made outputs."""
    from mixport.runtime.ort_session import OrtSession

    session = OrtSession(debug, manifest)
    session.reset(1)
    empty = list(session.past)
    out = _whole(session.run, ref.sequence, empty)
    stat = _stat("onnxruntime", ref, out, manifest.config["num_hidden_layers"])
    stat.routing = check._routing_stats([ref.out], [out], *ref.routers)
    exact = _whole(_named(exact_session(model_path)), ref.sequence, empty)["logits"]
    stat.implementation = float(np.abs(exact - ref.dequantized_logits).max())
    stat.implementation_rms = float(np.sqrt(np.mean((exact - ref.dequantized_logits) ** 2)))
    stat.implementation_limit = qe.EXACT if manifest.dtype == "fp32" else qe.APPROXIMATE  # fp16 activations
    stat.perplexity = qe.perplexity(session.run, text_ids, empty) if text_ids else None
    session.close()
    stat.greedy = check.ort_greedy(model_path, manifest, ref.prompt, steps) if steps else []
    return stat


def _stat(name: str, ref: _Reference, out: dict[str, np.ndarray], layers: int) -> qe.BackendStat:
    outputs = qe.output_errors(ref.out, out, layers)
    stat = qe.BackendStat(name, outputs, len(ref.sequence), qe.top1(ref.out["logits"], out["logits"]))
    stat.implementation = float(np.abs(out["logits"] - ref.dequantized_logits).max())
    stat.implementation_rms = float(np.sqrt(np.mean((out["logits"] - ref.dequantized_logits) ** 2)))
    return stat


def exact_session(model_path: Path | str) -> Any:  # -> onnxruntime.InferenceSession
    """model.onnx in ONNX Runtime's CPU provider with fp32 activations in its quantized MatMuls."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.add_session_config_entry(*EXACT_QDQ)
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])


def exact_greedy(model_path: Path, manifest: Manifest, prompt: list[int], count: int) -> list[int]:
    """``count`` free-running greedy tokens from ``exact_session`` (each step reruns the whole sequence)."""
    session = exact_session(model_path)
    infer = _named(session)
    dtype = np.float16 if manifest.dtype == "fp16" else np.float32
    past = [np.zeros((1, heads, 0, width), dtype) for heads, width in manifest.cache_shapes()]
    tokens: list[int] = []
    for _ in range(count):
        out = _whole(infer, prompt + tokens, past)
        tokens.append(int(out["logits"][0, -1].argmax()))
    return tokens


def _named(session: Any) -> qe.Infer:
    names = [o.name for o in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(names, feed), strict=True))


def _measure_fast(folder: Path, manifest: Manifest, target: check_target.CheckTarget, ref: _Reference,
                  text_ids: list[int] | None, steps: int) -> qe.BackendStat:
    """The fast graph `mixport run` uses on CPU (built into the folder when missing), when it stands
    for the checked file and can be built; else ``skipped`` says why not."""
    from mixport.runtime import ort_graph
    from mixport.runtime.ort_fast import OrtFastSession
    from mixport.tools.check_fast import greedy_tokens

    if target.not_derived is not None:
        return qe.BackendStat(FAST, skipped=target.not_derived)
    why = ort_graph.supported(manifest.config, manifest.dtype)
    if why:
        return qe.BackendStat(FAST, skipped=f"`mixport run` uses model.onnx for this model ({why})")
    try:
        session = OrtFastSession(ort_graph.ensure(folder, manifest), manifest)
    except MixportError as exc:
        return qe.BackendStat(FAST, skipped=f"fast graph unavailable: {exc}")

    def infer(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if feed["position_ids"][0, 0] == 0:
            session.reset(1)
        return {"logits": session.step(feed["input_ids"], feed["attention_mask"], feed["position_ids"])}

    stat = _stat(FAST, ref, _whole(infer, ref.sequence, []), 0)
    stat.implementation_limit = qe.APPROXIMATE
    stat.perplexity = qe.perplexity(infer, text_ids, []) if text_ids else None
    stat.greedy = greedy_tokens(session, ref.prompt, steps) if steps else []
    session.close()
    return stat


def _require_memory(model_path: Path, record: QuantRecord) -> None:
    """The reference holds fp32 weights: about the quantized file's bytes x 32 / bits."""
    files = [model_path, model_path.with_name(model_path.name + ".data")]
    fp32 = sum(f.stat().st_size for f in files if f.is_file()) * 32 // record.bits
    need, free = 2 * fp32 + check.LIBRARIES, memory.available_memory()
    if free is not None and need > free:
        from mixport.errors import CheckUnavailable

        raise CheckUnavailable("not enough memory for the quantization check here",
                               given=f"about {fp32 / 1e9:.1f} GB of fp32 reference weights, "
                                     f"{free / 1e9:.1f} GB available",
                               expected=f"about {need / 1e9:.0f} GB", hint="run `mixport check` on a larger machine")


def dequantize_reference(model: DecoderModel, record: QuantRecord) -> list[str]:
    """Replace, in place, the weights a quantized export quantizes (every Linear: attention q/k/v/o,
    routed and shared experts, dense MLPs; lm_head when ``record.lm_head``; never the router, the
    shared expert's sigmoid gate, norms or embeddings) by quantize -> dequantize under ``record``'s
    scheme, blocks along the input axis as the export makes them. Returns the names replaced."""
    import torch

    from mixport import quant

    scheme = quant.Scheme(record.bits, record.block_size, record.symmetric)
    kept, done = _kept_float(model, record), []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or id(module) in kept:
            continue
        w = module.weight.detach().float().numpy()  # [out, in]: blocks along axis -1 (the input axis)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(quant.dequantized(quant.quantize(w, scheme, axis=-1))))
        done.append(name)
    return done


def _kept_float(model: DecoderModel, record: QuantRecord) -> set[int]:
    """The Linear modules a quantized export keeps in float: shared experts' gates, MLA's kv_b_proj (its
    weight is split per head, not multiplied as one 2-D MatMul weight), lm_head unless quantized."""
    from mixport.models.components import SparseMoeBlock
    from mixport.models.mla import MLAttention

    kept = {id(getattr(m, m.layout.shared_gate)) for m in model.modules()
            if isinstance(m, SparseMoeBlock) and hasattr(m, m.layout.shared_gate)}
    kept |= {id(m.kv_b_proj) for m in model.modules() if isinstance(m, MLAttention)}
    if not record.lm_head:
        kept.add(id(model.lm_head))
    return kept


def format_quant_report(report: qe.QuantReport) -> str:
    """One table: a row per metric, a column per backend (the limit beside each)."""
    from mixport.tools.quant_report import table

    return "\n".join(table(report))


def quant_summary(folder: Path, steps: int = 8) -> list[str]:
    """The lines `mixport export --quantize` prints at its end: the quantization error table
    (its last line says PASSED or FAILED) followed by the check's notes."""
    report = run_quant_check(folder, steps=steps)
    return format_quant_report(report).splitlines() + [f"note: {n}" for n in report.notes]
