"""Graph passes: one explicit, ordered PIPELINE; each pass returns how many rewrites it made.

Targets choose what the fused ``mixport::MoE`` nodes run when no plugin is registered:

* ``portable``     sparse function body (TopK-sorted slots / Gather / Split / MatMul): ONNX Runtime, any EP
* ``trt-noplugin`` dense function body (one-hot + batched MatMul): parses and builds in TensorRT
* ``ort``          ONNX Runtime's ``com.microsoft.MoE`` contrib op (ORT only), sparse body otherwise
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from mixport import artifact, onnx_io, ops, quant, staging
from mixport.errors import PassError
from mixport.onnx_io import WeightFiles
from mixport.passes import fold_constants, fuse_moe_experts, lower_ort_moe, moe_bodies, quantize_weights, remove_dead
from mixport.passes import graph_utils as gu

TARGETS = ("portable", "trt-noplugin", "ort")
QuantOptions = quant.QuantOptions
BODY_FOR_TARGET = {"portable": "sorted", "trt-noplugin": "dense", "ort": "sorted"}


@dataclass(frozen=True)
class Pass:
    name: str
    apply: Callable[..., int]  # (graph, reasons[, files]) -> rewrites
    required: bool = False  # must fire on a graph with unfused TopKRouting nodes
    targets: tuple[str, ...] = TARGETS
    makes_weights: bool = False  # also takes the WeightFiles its big new tensors are written to
    quantizes: bool = False  # runs only when quantization is asked for, and takes its options


PIPELINE: tuple[Pass, ...] = (
    Pass(fold_constants.NAME, fold_constants.apply),
    Pass(fuse_moe_experts.NAME, fuse_moe_experts.apply, required=True, makes_weights=True),
    Pass(quantize_weights.NAME, quantize_weights.apply, makes_weights=True, quantizes=True),
    Pass(lower_ort_moe.NAME, lower_ort_moe.apply, targets=("ort",), makes_weights=True),
    Pass(remove_dead.NAME, remove_dead.apply),
)
ATTACH = "attach_moe_body"


@dataclass
class PipelineReport:
    model: onnx.ModelProto
    target: str
    counts: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return report_lines(self.counts, self.reasons)


def report_lines(counts: dict[str, int], reasons: list[str]) -> list[str]:
    """What ``-v`` prints: each pass's rewrites, then why patterns did not match."""
    return [f"pass {name}: {count} rewrites" for name, count in counts.items()] + \
        [f"  no match: {why}" for why in reasons]


def _check_required(graph: gs.Graph, step: Pass, report: PipelineReport) -> None:
    routers, moes = len(gu.mixport_nodes(graph, ops.TOPK_ROUTING)), len(gu.mixport_nodes(graph, ops.MOE))
    if routers and moes < routers:
        why = "; ".join(r for r in report.reasons if r.startswith(step.name)) or "no reason recorded"
        raise PassError(f"required pass {step.name} left {routers - moes} of {routers} MoE layers unfused",
                        given=why, expected="one mixport MoE node per TopKRouting node",
                        hint="is this a Mixtral-style export from `mixport export --no-fuse`?")


def run_passes(proto: onnx.ModelProto, target: str = "portable", weights_dir: Path | None = None,
               work_dir: Path | None = None, detail: Callable[[str], None] | None = None,
               quantize: QuantOptions | None = None) -> PipelineReport:
    """Run PIPELINE for ``target`` and attach the MoE function body; the full report.

    ``quantize``: also run the quantization pass (weight-only; the model then imports
    ``ops.QUANT_OPSET``), which must quantize something.

    ``weights_dir``: ``proto``'s external-data weights are read from there (memory-mapped, never
    all loaded), and the stacked expert weights the passes make are written to
    ``work_dir/artifact.FUSED_DATA`` (default: ``weights_dir``); the report's model then points
    into those files, relative to ``weights_dir`` (see ``onnx_io.WeightFiles``, which the passes
    get explicitly). ``detail(text)`` hears of each tensor written there (progress for big models)."""
    if target not in TARGETS:
        raise PassError("unknown optimization target", given=target, expected=" | ".join(TARGETS))
    gu.tensorize_constants(proto)  # same meaning; keeps onnx-graphsurgeon's import exact
    files = None if weights_dir is None else WeightFiles(
        Path(weights_dir), Path(work_dir or weights_dir) / artifact.FUSED_DATA,
        on_write=None if detail is None else (lambda name: detail(f"wrote {name}")))
    graph = gu.import_graph(proto, files)
    report = PipelineReport(proto, target)
    for step in PIPELINE:
        if target not in step.targets or (step.quantizes and quantize is None):
            continue
        args = (graph, report.reasons, files) if step.makes_weights else (graph, report.reasons)
        report.counts[step.name] = step.apply(*args, quantize) if step.quantizes else step.apply(*args)
        if step.required:
            _check_required(graph, step, report)
        if step.quantizes and not report.counts[step.name]:
            raise PassError("nothing to quantize in this model", given="; ".join(
                r for r in report.reasons if r.startswith(step.name)) or "no MoE node, no constant MatMul weight",
                expected="a Mixtral-style export with float weights")
    model = gs.export_onnx(graph)
    model.ir_version = proto.ir_version
    report.counts[ATTACH] = moe_bodies.attach(model, BODY_FOR_TARGET[target])
    if quantize is not None or moe_bodies.quantized(model):
        gu.set_opset(model, ops.QUANT_OPSET)
    report.model = model
    return report


def run_pipeline(proto: onnx.ModelProto, target: str = "portable", verbose: bool = False
                 ) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The fused model and {pass_name: rewrites}; with ``verbose`` the counts and no-match reasons
    go to stderr. Raises PassError when a Mixtral graph's experts could not be fused.
    ``proto`` itself is only touched where Constant nodes are rewritten to an equivalent form."""
    report = run_passes(proto, target)
    if verbose:
        print("\n".join(report.lines()), file=sys.stderr)
    return report.model, report.counts


def optimize_file(src: Path, dst: Path, target: str = "portable", quantize: QuantOptions | None = None
                  ) -> PipelineReport:
    """``mixport optimize``: read SRC, run the pipeline, write DST (+ DST.data past 2 GB).

    SRC's external data is memory-mapped, not loaded, and the stacked experts go to a work file
    beside DST: a model far bigger than memory optimizes. DST appears only when complete, and never
    over SRC or a weights file SRC reads (nor DST.data, where DST's weights go past 2 GB)."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise PassError("input model not found", given=str(src), expected="an .onnx file")
    try:
        proto = onnx.load(str(src), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise PassError("cannot read the input model", given=f"{src}: {type(exc).__name__}",
                        expected="an ONNX model file") from None
    onnx_io.check_external_locations(src, proto)  # before any weight is read
    weights = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    staging.check_output_file(dst, [src, *(src.parent / name for name in sorted(weights))])  # never over SRC
    with artifact.atomic_write(dst) as out:  # the work files (stacked experts) stay behind in its folder
        report = run_passes(proto, target, weights_dir=src.parent, work_dir=out.parent, quantize=quantize)
        artifact.save_onnx(report.model, out, weights_dir=src.parent, work_dir=out.parent)
        artifact.remove_work_files(out.parent)
    return report
