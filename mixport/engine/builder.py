"""Build a TensorRT engine from a mixport ONNX file (TensorRT or TensorRT-RTX).

    result = build_engine("model.onnx", "model.engine", dtype="fp16", targets=["sm89"])
    assert {l.plugin for l in result.plugin_layers} == {"mixport::TopKRouting", "mixport::MoE"}
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from mixport.artifact import atomic_write
from mixport.engine.network import (
    LayerInfo,
    ParsedNetwork,
    collect_plugin_errors,
    list_layers,
    parse_onnx,
)
from mixport.engine.profiles import ProfileSpec, ShapeRange, input_shapes
from mixport.engine.symlink import ensure_parser_symlink
from mixport.engine.targets import DTYPES, apply_targets, check_dtype, resolve_targets
from mixport.engine.trt_logger import make_logger
from mixport.errors import BuildError
from mixport.plugins.registry import register_plugins
from mixport.plugins.trt_import import RTX, describe, flavor_of, import_trt


@dataclass(frozen=True)
class BuildResult:
    """What was built, for what, and from which layers.

    ``layers`` are the parsed network's layers (before TensorRT's fusions): the
    engine inspector needs a GPU to deserialize an RTX engine, the network not.
    """

    engine_path: Path
    engine_bytes: int
    trt: str  # e.g. "TensorRT-RTX 1.7.1.116 (tensorrt_rtx_bindings)"
    flavor: str  # "tensorrt" or "tensorrt_rtx"
    dtype: str | None  # the network's float precision: "fp32", "fp16", "bf16"
    targets: tuple[str, ...]  # concrete targets, e.g. ("sm80", "sm86") or ("ampere+",)
    use_plugins: bool
    layers: tuple[LayerInfo, ...]
    profile: dict[str, ShapeRange]
    seconds: float

    @property
    def plugin_layers(self) -> tuple[LayerInfo, ...]:
        """The IPluginV3 layers (mixport nodes that became plugins)."""
        return tuple(layer for layer in self.layers if layer.type == "PLUGIN_V3")


def network_dtype(trt: ModuleType, network: Any) -> str | None:
    """The float precision of the network's I/O: fp16/bf16 if any, else fp32, else None."""
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    tensors += [network.get_output(i) for i in range(network.num_outputs)]
    names = {t.dtype.name for t in tensors}
    for dtype in ("fp16", "bf16", "fp32"):
        if DTYPES[dtype] in names:
            return dtype
    return None


def _check_dtype_matches(trt: ModuleType, network: Any, dtype: str | None,
                         path: Path) -> str | None:
    found = network_dtype(trt, network)
    if dtype is not None and found is not None and check_dtype(dtype) != found:
        raise BuildError(
            "the requested dtype differs from the ONNX file's", given=f"{dtype} for {path}",
            expected=found, hint="networks are strongly typed: the engine's precision is "
                                 f"the ONNX file's; re-export in {dtype} or pass dtype={found!r}")
    return found


def add_profile(builder: Any, config: Any, parsed: ParsedNetwork,
                spec: ProfileSpec) -> dict[str, ShapeRange]:
    """One optimization profile covering every dynamic input; returns its shapes."""
    network, shapes = parsed.network, {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(int(d) for d in tensor.shape)
        if tensor.name in spec.shapes or any(d < 0 for d in dims):
            params = parsed.dim_params.get(tensor.name, [])
            shapes[tensor.name] = input_shapes(spec, tensor.name, dims, params)
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise BuildError("TensorRT rejected the optimization profile", given=shapes)
    return shapes


def write_atomically(path: Path, data: Any) -> int:
    """Write ``data`` (a buffer) to ``path`` (``artifact.atomic_write``); returns bytes."""
    with atomic_write(path) as tmp, tmp.open("wb") as handle:
        return handle.write(memoryview(data))


def _prepare(trt: ModuleType, onnx_path: Path, use_plugins: bool) -> None:
    if not onnx_path.is_file():
        raise BuildError("ONNX file not found", given=str(onnx_path),
                         hint="export it first: mixport export")
    if use_plugins:
        register_plugins(trt)
    if flavor_of(trt) == RTX:
        ensure_parser_symlink()


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, dtype: str | None = None,
                 targets: str | Sequence[str] | None = None,
                 profiles: ProfileSpec | None = None, use_plugins: bool = True,
                 trt_module: ModuleType | None = None) -> BuildResult:
    """Parse ``onnx_path``, build a serialized engine and write it atomically to ``engine_path``.

    dtype: expected network precision ("fp32" | "fp16" | "bf16"); None accepts the file's.
    targets: TensorRT-RTX: "sm75".."sm121", "ampere+" (default: every SM >= 80, no GPU
      needed) or "current"; full TensorRT: "current" (default, local GPU) or "ampere+".
    profiles: batch/seq/past ranges and per-input overrides (default ProfileSpec()).
    use_plugins: mixport nodes become IPluginV3 layers; False inlines their ONNX bodies.
    """
    start = time.perf_counter()
    if dtype is not None:
        dtype = check_dtype(dtype)
    trt = trt_module or import_trt()
    names = resolve_targets(trt, targets)
    spec = profiles or ProfileSpec()
    spec.check()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    _prepare(trt, onnx_path, use_plugins)
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    parsed = parse_onnx(trt, builder, logger, onnx_path, use_plugins)
    found = _check_dtype_matches(trt, parsed.network, dtype, onnx_path)
    config = builder.create_builder_config()
    concrete = apply_targets(trt, config, names)
    shapes = add_profile(builder, config, parsed, spec)
    plugin_errors: list[str] = []
    with collect_plugin_errors(plugin_errors):
        serialized = builder.build_serialized_network(parsed.network, config)
    if serialized is None:
        raise BuildError("TensorRT could not build the engine: "
                         + ("; ".join(plugin_errors + logger.errors) or "no error reported"),
                         given=f"{onnx_path} for {', '.join(concrete)}")
    size = write_atomically(engine_path, serialized)
    return BuildResult(engine_path, size, describe(trt), flavor_of(trt), found, concrete,
                       use_plugins, list_layers(trt, parsed.network), shapes,
                       time.perf_counter() - start)
