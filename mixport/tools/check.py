"""``mixport check``: PyTorch vs ONNX Runtime (and TensorRT) through Polygraphy's Comparator.

Teacher-forced: the prompt and the greedy continuation come from the PyTorch
reference; every runner sees the same tokens (and ONNX Runtime the reference's
cache), so each step compares like with like. Routing ids per layer are compared
as sets, for each layer with a router (dense-MLP layers have none); tokens whose k-th and (k+1)-th
router logits tie are counted apart.
TensorRT joins (compared with the reference, outputs only) when the folder's
engine is up to date and a GPU is visible; otherwise ``notes`` says why not.

What is compared is the file given (``check_target``): the folder's model.onnx as it is
now, even when it changed since export (a note says so), or ``onnx_path``. The fast graph
and the engine are compared only when they were built from that very file; the check never
rebuilds them. Polygraphy's own log lines go to the ``Polygraphy`` Python logger when
``verbose`` (the CLI shows them on stderr with ``-v``), else nowhere.
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mixport import onnx_io, ops
from mixport.artifact import Manifest
from mixport.errors import CheckUnavailable
from mixport.models import registry
from mixport.models.config import DEFAULT_MODEL_TYPE
from mixport.runtime import memory
from mixport.tools import check_target
from mixport.tools.check_fast import FastGraphStat, check_fast_graph, greedy_tokens

if TYPE_CHECKING:  # torch and the exporter are imported when a check runs, after its arguments are checked
    from mixport.models.components import DecoderModel

TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (5e-2, 5e-2), "bf16": (2.5e-1, 1e-1)}  # atol, rtol
TIE_GAP = 1e-5  # router logits whose k-th and (k+1)-th differ by <= this x max(1, |k-th|) tie


@dataclass
class OutputStat:
    name: str
    max_abs: float
    max_rel: float
    passed: bool


@dataclass
class RoutingStat:
    layer: int  # the decoder layer (its index in the model, dense layers counted)
    tokens: int
    agree: int
    ties: int  # tokens whose k-th / (k+1)-th router logits tie (either pick is right)
    tie_mismatch: int

    @property
    def passed(self) -> bool:
        return self.agree + self.tie_mismatch == self.tokens


@dataclass
class CheckReport:
    runners: list[str]
    steps: int
    atol: float
    rtol: float
    outputs: list[OutputStat] = field(default_factory=list)
    routing: list[RoutingStat] = field(default_factory=list)  # one per layer with a router
    dense_layers: list[int] = field(default_factory=list)  # decoder layers with a dense MLP (no router to compare)
    notes: list[str] = field(default_factory=list)  # e.g. why TensorRT was not compared
    fast: FastGraphStat | None = None  # the graph `mixport run` uses on CPU
    ref_tokens: list[int] = field(default_factory=list)
    ort_tokens: list[int] = field(default_factory=list)
    tokens_must_match: bool = True  # greedy tokens may legitimately flip on near-ties in fp16/bf16

    @property
    def same_tokens(self) -> int:
        """Length of the common prefix of the two free-running greedy sequences."""
        return self.common_prefix(self.ort_tokens)

    def common_prefix(self, tokens: list[int]) -> int:
        """How many of ``tokens`` agree with the reference's greedy tokens before the first difference."""
        n = 0
        for a, b in zip(self.ref_tokens, tokens, strict=False):
            if a != b:
                break
            n += 1
        return n

    @property
    def fast_passed(self) -> bool:
        f = self.fast
        if f is None or f.skipped:
            return True
        return f.within and (not self.tokens_must_match or self.common_prefix(f.tokens) == len(self.ref_tokens))

    @property
    def passed(self) -> bool:
        return not self.failures()

    def failures(self) -> list[str]:
        """What differs, by name: outputs, layers whose experts differ, greedy tokens, the fast graph."""
        failed = [o.name for o in self.outputs if not o.passed]
        failed += [f"routing of layer {r.layer}" for r in self.routing if not r.passed]
        if self.tokens_must_match and self.same_tokens != len(self.ref_tokens):
            failed.append("greedy tokens")
        if not self.fast_passed:
            failed.append("the fast ORT graph")
        return failed


def debug_model(model_path: Path, tmp: Path) -> Path:
    """A copy of model.onnx that also outputs every TopKRouting's ids as routing.{i}.ids."""
    import onnx

    onnx_io.check_external_locations(model_path)  # before onnx reads any external data
    proto = onnx.load(str(model_path))
    routers = [n for n in proto.graph.node if n.domain == ops.DOMAIN and n.op_type == ops.TOPK_ROUTING]
    for i, node in enumerate(routers):
        name = f"routing.{i}.ids"
        proto.graph.node.append(onnx.helper.make_node("Identity", [node.output[1]], [name]))
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    path = tmp / "debug.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, location="debug.onnx.data")
    return path


def reference_feeds(model: DecoderModel, prompt: list[int], steps: int
                    ) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """Prefill + ``steps`` greedy decode feeds (the past taken from the reference's present),
    and the steps + 1 greedy tokens the reference chose."""
    import torch

    cfg = model.cfg
    past = model.empty_past(1)
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    pos = torch.arange(len(prompt))[None]
    feeds, tokens = [], []
    for _ in range(steps + 1):
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
        for i in range(cfg.num_hidden_layers):
            feed[f"past_key_values.{i}.key"] = past[2 * i].numpy()
            feed[f"past_key_values.{i}.value"] = past[2 * i + 1].numpy()
        feeds.append(feed)
        with torch.no_grad():
            logits, past = model(ids, mask, pos, past)
        ids = logits[:, -1:].argmax(-1)
        tokens.append(int(ids))
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    return feeds, tokens


def ort_greedy(model_path: Path, manifest: Manifest, prompt: list[int], count: int) -> list[int]:
    """Free-running greedy tokens from ONNX Runtime (its own cache, its own choices)."""
    from mixport.runtime.ort_session import OrtSession

    return greedy_tokens(OrtSession(model_path, manifest), prompt, count)


@contextlib.contextmanager
def polygraphy_logs(verbose: bool) -> Iterator[None]:
    """Polygraphy's log lines (it prints them on stdout) through the ``Polygraphy`` Python logger:
    INFO and up when ``verbose``, none otherwise (its [E] FAILED lines would land in the report).
    Colors off: Polygraphy would print "[W] 'colored' module is not installed" on stdout."""
    from polygraphy.logger import G_LOGGER

    old = (G_LOGGER.module_severity, G_LOGGER.use_python_logging_system, G_LOGGER.colors)
    G_LOGGER.use_python_logging_system = True
    G_LOGGER.colors = False
    G_LOGGER.module_severity = G_LOGGER.INFO if verbose else G_LOGGER.CRITICAL + 1
    try:
        yield
    finally:
        G_LOGGER.module_severity = old[0]
        G_LOGGER.use_python_logging_system = old[1]
        G_LOGGER.colors = old[2]


def _skip_routing(name: str, _index: int, iter_result: Any) -> list[str]:
    if name.startswith("routing.") or name not in iter_result:
        return []
    return [name]


def _output_stats(accuracy: Any, atol: float, rtol: float) -> list[OutputStat]:
    """Worst case over every step, per output; outputs of runners after the second are
    labelled "name [runner]" (every pair is (reference, runner))."""
    worst: dict[str, OutputStat] = {}
    for acc in accuracy:  # one AccuracyResult per compare function
        for index, ((_ref, runner), iterations) in enumerate(acc.items()):
            label = f" [{runner}]" if index else ""
            for iteration in iterations:
                for output, res in iteration.items():
                    stat = OutputStat(output + label, float(res.max_absdiff), float(res.max_reldiff), bool(res))
                    old = worst.setdefault(stat.name, stat)
                    worst[stat.name] = OutputStat(stat.name, max(old.max_abs, stat.max_abs),
                                                  max(old.max_rel, stat.max_rel), old.passed and stat.passed)
    return list(worst.values())


def routing_ties(logits: np.ndarray, k: int) -> np.ndarray:
    """logits [T, E] -> [T] bool: the k-th and (k+1)-th largest router logits tie (within TIE_GAP,
    relative to the k-th's size), so either expert is a right pick. Logits, not probabilities:
    two tiny probabilities are close without being a tie."""
    if logits.shape[1] <= k:
        return np.zeros(len(logits), bool)
    srt = -np.sort(-logits, axis=1)
    with np.errstate(invalid="ignore"):  # masked (-inf) choices: never a tie
        return srt[:, k - 1] - srt[:, k] <= TIE_GAP * np.maximum(1.0, np.abs(srt[:, k - 1]))


def _routing_stats(ref: list[Any], ort: list[Any], layers: list[int], k: int,
                   topk_group: int = 1) -> list[RoutingStat]:
    """Per MoE layer (``layers``: the decoder layers with a router, in TopKRouting node order)."""
    stats = []
    for j, layer in enumerate(layers):
        tokens = agree = ties = tie_mismatch = 0
        for r, o in zip(ref, ort, strict=True):
            logits = r[f"routing.{j}.logits"].reshape(-1, r[f"routing.{j}.logits"].shape[-1])
            a = np.sort(r[f"routing.{j}.ids"].reshape(len(logits), -1), axis=1)
            b = np.sort(o[f"routing.{j}.ids"].reshape(len(logits), -1), axis=1)
            choice = f"routing.{j}.choice"  # the scores the picks are made by (a Polygraphy IterationResult)
            tie = routing_ties(r[choice] if choice in r else logits, k)
            if f"routing.{j}.groups" in r:  # grouped top-k: groups tied at the kept / dropped boundary too
                tie |= routing_ties(r[f"routing.{j}.groups"], topk_group)
            same = (a == b).all(axis=1)
            tokens += len(logits)
            agree += int(same.sum())
            ties += int(tie.sum())
            tie_mismatch += int((~same & tie).sum())
        stats.append(RoutingStat(layer, tokens, agree, ties, tie_mismatch))
    return stats


def torch_runner(source: Path, model: DecoderModel, prefer_transformers: bool):  # -> BaseRunner
    from mixport.tools.torch_runners import ReferenceRunner, TransformersRunner

    if prefer_transformers:
        try:
            import transformers  # noqa: F401
            adapter = registry.for_config(model.cfg)
            routers = [model.get_submodule(f"layers.{i}.{adapter.router_path}") for i in adapter.moe_layers(model.cfg)]
            return TransformersRunner(source, adapter, len(routers), routers=routers)
        except ImportError:
            pass
    return ReferenceRunner(model)


def run_check(folder: Path, *, steps: int = 8, prompt_len: int = 12, prefer_transformers: bool = True,
              seed: int = 0, onnx_path: Path | None = None, verbose: bool = False,
              dequantized: bool = False) -> CheckReport:
    """Compare PyTorch (FOLDER's source model) and ONNX Runtime over a prefill + ``steps`` decodes.

    The ONNX side is FOLDER's model.onnx as it is now, or ``onnx_path`` (same inputs and outputs).
    ``verbose``: Polygraphy's log lines go to the ``Polygraphy`` logger (else they are dropped).
    ``dequantized`` (a quantized folder): the reference is mixport's model on the source weights
    quantized -> dequantized by the folder's scheme (``check_quant.dequantize_reference``)."""
    from mixport.tools import check_quant, quant_metrics

    folder = Path(folder)
    manifest = Manifest.read(folder)
    record = quant_metrics.require_quantized(manifest, folder) if dequantized else None
    check_target.require_steps(manifest, steps, prompt_len)
    target = check_target.resolve(folder, manifest, onnx_path)
    model_path = target.path
    dtype = manifest.dtype
    _require_runnable(dtype)
    _require_memory(model_path, dtype)
    atol, rtol = TOLERANCES[dtype]
    src_info = manifest.source

    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator
    from polygraphy.comparator.compare import SimpleCompareFunc

    from mixport.exporter.export import resolve_source
    from mixport.exporter.loader import load_reference

    with resolve_source(Path(src_info.path) if src_info.path else None, src_info.builtin) \
            as (src, _), tempfile.TemporaryDirectory(prefix="mixport-check-") as tmp, polygraphy_logs(verbose):
        ref_model, cfg, _ = load_reference(src, "fp32")
        _require_family(manifest, cfg, src)
        if record is not None:
            check_quant.dequantize_reference(ref_model, record)
            prefer_transformers = False
        moe_layers = registry.for_config(cfg).moe_layers(cfg)  # the layers with a router: one TopKRouting each
        _require_routers(target, len(moe_layers))
        rng = np.random.default_rng(seed)
        prompt = rng.integers(3, cfg.vocab_size, prompt_len).tolist()
        feeds, ref_tokens = reference_feeds(ref_model, prompt, steps)
        if dtype != "fp32":
            feeds = [_cast_past(f, dtype) for f in feeds]
        torch_side = torch_runner(src, ref_model, prefer_transformers)
        del ref_model  # a transformers runner loads its own copy, in turn with the other runners
        gc.collect()
        debug = str(debug_model(model_path, Path(tmp)))
        session = SessionFromOnnx(debug) if record is None else (lambda: check_quant.exact_session(debug))
        runners = [torch_side, OnnxrtRunner(session, name="onnxruntime")]
        skip = target.not_derived if record is None else target.not_derived or check_quant.DEQUANTIZED_ONLY
        notes = target.notes + _add_tensorrt(runners, folder, manifest, skip)
        results = Comparator.run(runners, data_loader=feeds)
        func = SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat="max",
                                  find_output_func=_skip_routing)
        accuracy = Comparator.compare_accuracy(results, compare_func=func,
                                               comparisons=[(0, i) for i in range(1, len(runners))])
        (_, ref_iters), (_, ort_iters) = list(results.items())[:2]
        report = CheckReport([r.name for r in runners], steps, atol, rtol, notes=notes)
        report.outputs = _output_stats(accuracy, atol, rtol)
        report.routing = _routing_stats(ref_iters, ort_iters, moe_layers, cfg.num_experts_per_tok, cfg.topk_group)
        report.dense_layers = [i for i in range(cfg.num_hidden_layers) if i not in moe_layers]
        report.ref_tokens = ref_tokens
        report.ort_tokens = (ort_greedy if record is None else check_quant.exact_greedy)(model_path, manifest, prompt,
                                                                                         len(ref_tokens))
        report.tokens_must_match = dtype == "fp32"
        ref_logits = [it["logits"][0, -1] for it in ref_iters]
        if skip is not None:  # never built (or rebuilt) from a file that is not the export's
            report.fast = FastGraphStat(skipped=skip)
        else:
            report.fast = check_fast_graph(folder, manifest, prompt, ref_tokens, ref_logits, atol, rtol)
            if report.fast.built:
                report.notes.append(f"built the fast ONNX Runtime graph into {folder} from its exported "
                                    "model.onnx (as `mixport run` would) and checked it")
    return report


def _require_family(manifest: Manifest, cfg: Any, src: Path) -> None:
    """The source model must still be the family the folder was exported from (a folder re-pointed at,
    or a source overwritten by, another family's checkpoint is refused, not compared)."""
    exported = manifest.config.get("model_type") or DEFAULT_MODEL_TYPE
    if exported != cfg.model_type:
        raise CheckUnavailable("the source model is another family than the export",
                               given=f"{src} is {registry.get(cfg.model_type).name} ({cfg.model_type})",
                               expected=f"{exported} (the manifest's config.model_type)",
                               hint="check an export against the checkpoint it was exported from")


def _require_routers(target: check_target.CheckTarget, moe_layers: int) -> None:
    """An --onnx file must hold one TopKRouting node per MoE layer (the experts picked are compared)."""
    if target.routers is not None and target.routers != moe_layers:
        raise CheckUnavailable(f"{target.path.name} has {target.routers} {ops.DOMAIN}::{ops.TOPK_ROUTING} "
                               f"nodes; the experts picked per layer cannot be compared",
                               given=str(target.path), expected=f"{moe_layers} (one per MoE layer)",
                               hint="--onnx compares another mixport export of the same model")


def _add_tensorrt(runners: list[Any], folder: Path, manifest: Manifest, not_derived: str | None = None) -> list[str]:
    """Append the TensorRT runner when it can run here; else one note saying why not."""
    from mixport.runtime.select import tensorrt_unavailable

    if not_derived is not None:
        return [f"TensorRT not compared: {not_derived}"]
    why_not = tensorrt_unavailable(folder, manifest)
    if why_not is not None:
        return [f"TensorRT not compared: {why_not}"]
    from mixport.tools.trt_runner import TrtSessionRunner

    runners.append(TrtSessionRunner(folder, manifest))
    return []


def _require_runnable(dtype: str) -> None:
    import onnxruntime as ort

    if dtype == "bf16" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise CheckUnavailable("ONNX Runtime's CPU provider cannot run bf16 graphs (no bf16 Mul/MatMul "
                               "kernels), so there is nothing to compare here", given="dtype bf16",
                               expected="fp32 or fp16 on CPU, or onnxruntime-gpu",
                               hint="check a --dtype fp32 export, or build the bf16 file with TensorRT")


# `mixport check` runs its backends one after another, but an ONNX Runtime session holds the stacked
# and the folded expert slabs while it loads: measured peak RSS 1.98 GB for the 0.49 GB fp32
# mini-Mixtral (`/usr/bin/time -v mixport check OUT --steps 2`; 3.6 GB while the reference model
# stayed alive next to the transformers copy), i.e. ~2.6x plus the libraries.
MEMORY_FACTOR = 3
LIBRARIES = 700 << 20


def _require_memory(model_path: Path, dtype: str) -> None:
    """Refuse up front, with one line, a check that would exhaust memory halfway (or be killed)."""
    files = [model_path, model_path.with_name(model_path.name + ".data")]
    fp32 = sum(f.stat().st_size for f in files if f.is_file()) * (1 if dtype == "fp32" else 2)  # fp16/bf16
    need, free = MEMORY_FACTOR * fp32 + LIBRARIES, memory.available_memory()
    if free is not None and need > free:
        raise CheckUnavailable("not enough memory for the parity check here",
                               given=f"{fp32 / 1e9:.1f} GB of fp32 weights, {free / 1e9:.1f} GB available",
                               expected=f"about {need / 1e9:.0f} GB (PyTorch and ONNX Runtime hold copies at once)",
                               hint="run `mixport check OUT` on a machine with more memory")


def _cast_past(feed: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    np_dtype = {"fp16": np.float16}.get(dtype)
    if np_dtype is None:
        import ml_dtypes  # bf16 numpy arrays; shipped with onnx
        np_dtype = ml_dtypes.bfloat16
    return {k: v.astype(np_dtype) if k.startswith("past") else v for k, v in feed.items()}


def format_report(report: CheckReport) -> str:
    """A plain table: one line per output, one per layer's routing."""
    a, b = report.runners[0], " and ".join(report.runners[1:])
    lines = [f"parity: {a} vs {b}, prefill + {report.steps} decode steps "
             f"(atol {report.atol:g}, rtol {report.rtol:g})",
             f"  {'output':<22} {'max abs err':>12} {'max rel err':>12}  result"]
    for o in report.outputs:
        lines.append(f"  {o.name:<22} {o.max_abs:>12.3e} {o.max_rel:>12.3e}  {'ok' if o.passed else 'FAIL'}")
    lines.append(f"  {'routing':<22} {'tokens':>12} {'same experts':>12}  ties")
    for r in report.routing:
        lines.append(f"  {'layer ' + str(r.layer):<22} {r.tokens:>12} {r.agree:>12}  {r.ties}"
                     f"{' (differ only on ties: ' + str(r.tie_mismatch) + ')' if r.tie_mismatch else ''}"
                     f"  {'ok' if r.passed else 'FAIL'}")
    if report.dense_layers:
        lines.append(f"  (dense MLP, no router: layer {', '.join(map(str, report.dense_layers))})")
    lines.append(f"  greedy tokens (free-running): {report.same_tokens}/{len(report.ref_tokens)} identical"
                 + ("" if report.tokens_must_match else " (informative at this dtype)"))
    f = report.fast
    if f is not None and f.skipped:
        lines.append(f"  fast ORT graph: not checked ({f.skipped})")
    elif f is not None:
        lines.append(f"  fast ORT graph (`mixport run` on CPU): logits max abs err {f.max_abs:.3e} "
                     f"{'ok' if f.within else 'FAIL'}; greedy tokens {report.common_prefix(f.tokens)}/"
                     f"{len(report.ref_tokens)} identical")
    lines.append("parity: PASSED" if report.passed else "parity: FAILED")
    return "\n".join(lines)
