"""ONNX Runtime backend of the Session interface (CPU by default, CUDA when asked and present)."""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mixport.artifact import Manifest
from mixport.errors import RuntimeFailure
from mixport.passes import nbits

if TYPE_CHECKING:
    import onnx

ACCURACY_CONFIG = "session.qdq_matmulnbits_accuracy_level"
DISABLE_QDQ = "session.disable_quant_qdq"  # also lets constant folding fold DequantizeLinear of constants
# MatMulNBits' accuracy_level for quantized weights in the fast graph (ONNX Runtime fuses each blocked
# DequantizeLinear -> MatMul into one MatMulNBits when the session starts): 4, activations quantized
# to int8 per block inside the kernel (what llama.cpp's q8_0 / q4_0 dot products do); 0/1 keep them
# fp32 (exact to the dequantized weights). The measurements behind it: runtime/ort_graph.py.
QUANT_ACCURACY_LEVEL = nbits.ACCURACY_LEVEL


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeFailure("ONNX Runtime has no CUDA provider here",
                                 given=f"--device cuda (providers here: {', '.join(available)})",
                                 expected="CUDAExecutionProvider",
                                 hint="pip install 'mixport[gpu]' (onnxruntime-gpu) on a CUDA machine, "
                                 "or use --device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise RuntimeFailure("unknown device", given=repr(device)[:40], expected="cpu | cuda")


def max_threads() -> int:
    """The most intra-op threads mixport gives ONNX Runtime: 4 per CPU this process may run on
    (more only adds memory and contention; 100000 threads exhausts the machine)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return 4 * max(cpus, 1)


def check_threads(threads: int | None) -> None:
    """None or 0: ONNX Runtime's default (one thread per physical core); else 1..max_threads()."""
    if threads is None:
        return
    top = max_threads()
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or not 0 <= threads <= top:
        raise RuntimeFailure("invalid thread count", given=repr(threads)[:40],
                             expected=f"1 to {top} (4 per CPU here), or none for one per physical core")


def quant_config(manifest: Manifest, accuracy_level: int | None = None) -> dict[str, str]:
    """The fast graph's session config for ``manifest``'s model: for quantized weights, the accuracy
    level of the MatMulNBits that ONNX Runtime fuses each blocked DequantizeLinear -> MatMul into
    (default ``QUANT_ACCURACY_LEVEL``); nothing for float weights."""
    if manifest.quantization is None:
        return {}
    level = QUANT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level
    return {ACCURACY_CONFIG: str(level)}


def portable_config(manifest: Manifest, accuracy_level: int | None = None) -> dict[str, str]:
    """model.onnx's session config: for quantized weights, by default ONNX Runtime's QDQ fusions off
    (``DISABLE_QDQ``), so that its constant folding dequantizes every weight once, when the session
    starts (fp32 speed and memory, exact numbers). Measured on the mini-Mixtral int4 (1 thread): 80 tok/s
    decode so (fp32's 83), 1.2 tok/s with the fusions on at any accuracy level: the MoE function body
    dequantizes whole expert stacks (Gather takes no int4), which ONNX Runtime then does at every step.
    ``accuracy_level``: fusions on at that level instead."""
    if manifest.quantization is None:
        return {}
    if accuracy_level is not None:
        return {ACCURACY_CONFIG: str(accuracy_level)}
    return {DISABLE_QDQ: "1", ACCURACY_CONFIG: str(QUANT_ACCURACY_LEVEL)}


def session_options(threads: int | None, config: dict[str, str] | None = None) -> Any:
    """Options tuned for one-request-at-a-time decoding: all graph optimizations, a fixed
    intra-op pool (physical cores by default), no inter-op pool, arena + memory pattern on;
    ``config``: more session config entries (``quant_config``)."""
    import onnxruntime as ort

    check_threads(threads)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:  # else ONNX Runtime's default: one thread per physical core
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.enable_cpu_mem_arena = True
    opts.enable_mem_pattern = True
    opts.log_severity_level = 4  # failures reach the user as one RuntimeFailure line, not ORT's log too
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    return opts


def open_session(model_path: Path, device: str, threads: int | None, config: dict[str, str] | None = None,
                 graph: onnx.ModelProto | None = None, shared: dict[str, np.ndarray] | None = None) -> Any:
    """An InferenceSession, or a RuntimeFailure with ONNX Runtime's first message line. ``shared``:
    initializers it computes with in place (``add_initializer``: the caller keeps the arrays alive as
    long as the session; ``ort_qmoe``'s parts, memory-mapped); ``graph``: the graph to run instead of
    the file's (its external data relative to the file's folder, ``ort_mapped``)."""
    import onnxruntime as ort

    from mixport import onnx_io
    from mixport.runtime import onnx_locate, ort_mapped

    if graph is None:  # before ONNX Runtime reads any external data
        onnx_locate.check_locations(model_path)
    else:
        onnx_io.check_external_locations(model_path, graph)
        config = {**(config or {}), ort_mapped.FOLDER_CONFIG: str(Path(model_path).parent.resolve())}
    providers, options = providers_for(device), session_options(threads, config)  # their own one-line errors
    in_place = [ort.OrtValue.ortvalue_from_numpy(v) for v in (shared or {}).values()]  # contiguous views
    for name, value in zip(shared or {}, in_place, strict=True):
        options.add_initializer(name, value)
    try:
        source = str(model_path) if graph is None else graph.SerializeToString()
        sess = ort.InferenceSession(source, options, providers=providers)
        sess.mixport_shared = in_place  # ONNX Runtime holds their buffers, not these Python objects
        return sess
    except Exception as exc:  # ORT raises its own exception types; one line for the user
        raise RuntimeFailure("ONNX Runtime could not load the model", given=f"{model_path}: "
                             f"{str(exc).splitlines()[0][:300]}", expected=f"a valid {model_path.name}") from None


def run_failure(exc: Exception) -> RuntimeFailure:
    """ONNX Runtime's error during a run, as one line (what failed, ORT's first message line)."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    return RuntimeFailure("ONNX Runtime failed while running the model", given=lines[-1][:300],
                          hint="try --graph portable; report this with the export folder's manifest.json")


class OrtSession:
    """model.onnx in an InferenceSession; the cache is the previous step's present tensors."""

    backend = "onnxruntime"

    def __init__(self, model_path: Path, manifest: Manifest, device: str = "cpu",
                 threads: int | None = None, accuracy_level: int | None = None) -> None:
        if manifest.dtype == "bf16" and device == "cpu":
            raise RuntimeFailure("ONNX Runtime's CPU provider cannot run bf16 graphs", given=str(model_path),
                                 expected="an fp32 or fp16 export for CPU",
                                 hint="export with --dtype fp32/fp16, or run bf16 with TensorRT / --device cuda")
        from mixport.runtime import memory, ort_mapped

        folds = DISABLE_QDQ in portable_config(manifest, accuracy_level)  # dequantizes to fp32 at load
        memory.require(model_path, manifest.dtype, device, dequantized=folds)  # one line, before loading
        mapped = ort_mapped.mapped(model_path)  # expert slabs read in place, not folded into copies
        self.slabs_mapped = mapped.slabs if mapped else 0
        self.sess = open_session(model_path, device, threads, portable_config(manifest, accuracy_level),
                                 graph=mapped.proto if mapped else None)
        cfg = manifest.config
        self.layers = cfg["num_hidden_layers"]
        self.cache_shapes = manifest.cache_shapes()  # (heads, width) per past tensor: MLA's k and v differ
        past = next(i for i in self.sess.get_inputs() if i.name.startswith("past_key_values"))
        self.dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(past.type)
        if self.dtype is None:
            raise RuntimeFailure("this ONNX Runtime build cannot feed the model's cache type",
                                 given=past.type, expected="float or float16",
                                 hint="export with --dtype fp32 or fp16 for ONNX Runtime's CPU provider")
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.past: list[Any] = []  # numpy arrays after reset, ONNX Runtime OrtValues after a step
        self.past_len = 0

    def reset(self, batch: int) -> None:
        self.past = [np.zeros((batch, heads, 0, width), self.dtype) for heads, width in self.cache_shapes]
        self.past_len = 0

    def feed(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> dict[str, np.ndarray]:
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                "position_ids": position_ids.astype(np.int64)}
        past = [p if isinstance(p, np.ndarray) else p.numpy() for p in self.past]
        for i in range(self.layers):
            feed[f"past_key_values.{i}.key"] = past[2 * i]
            feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
        return feed

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One raw inference (Polygraphy-runner shaped): every graph output by name."""
        return dict(zip(self.output_names, self.sess.run(self.output_names, feed), strict=True))

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray) -> np.ndarray:
        """One cached step through IOBinding: the presents stay ONNX Runtime values and are bound
        as the next step's pasts, never copied out to numpy."""
        io = self.sess.io_binding()
        for name, arr in (("input_ids", input_ids), ("attention_mask", attention_mask),
                          ("position_ids", position_ids)):
            io.bind_cpu_input(name, np.ascontiguousarray(arr, dtype=np.int64))
        names = [f"{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]
        for name, past in zip(names, self.past, strict=True):
            if isinstance(past, np.ndarray):
                io.bind_cpu_input(f"past_key_values.{name}", past)
            else:
                io.bind_ortvalue_input(f"past_key_values.{name}", past)
        io.bind_output("logits", "cpu")
        for name in names:
            io.bind_output(f"present.{name}", "cpu")
        try:
            self.sess.run_with_iobinding(io)
        except Exception as exc:  # ORT raises RuntimeError / its own types
            raise run_failure(exc) from None
        out = io.get_outputs()  # in bind order: logits, then the presents
        self.past = list(out[1:])
        self.past_len += input_ids.shape[1]
        return out[0].numpy()

    def close(self) -> None:
        self.sess = None
