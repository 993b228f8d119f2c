"""``mixport build``: an export folder's model.onnx -> model.engine, recorded in manifest.json.

    result = build_folder("out", BuildRequest(targets="sm80,sm86"))
    print(result.message, result.record["plugin_layer_count"])

The engine is built into a hidden temp folder inside OUT_DIR, checked (every
mixport node must have become a plugin layer when plugins are on), renamed into
place (``artifact.atomic_write``), and only then recorded in the manifest (also
atomic). An existing engine is never replaced without ``force``.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import mixport
from mixport import artifact
from mixport.artifact import ENGINE_FILE, EngineRecord, Manifest
from mixport.engine.builder import BuildResult, build_engine
from mixport.engine.prepare import prepare_for_parser
from mixport.engine.profiles import ProfileSpec, Range
from mixport.engine.status import engine_status, visible_gpu
from mixport.engine.targets import check_dtype, resolve_targets
from mixport.errors import BuildError
from mixport.ops import DOMAIN, MOE, TOPK_ROUTING
from mixport.plugins.trt_import import flavor_of, import_trt


@dataclass(frozen=True)
class BuildRequest:
    """What to build; None means "the default" (or, for an existing engine, "whatever it has")."""

    targets: str | None = None  # "ampere+", "sm80,sm86", "current"
    dtype: str | None = None  # must match the ONNX file's precision
    batch: Range | None = None
    seq: Range | None = None
    past: Range | None = None
    use_plugins: bool = True
    force: bool = False


@dataclass(frozen=True)
class FolderBuild:
    folder: Path
    built: bool  # False: the engine was already up to date
    message: str
    record: EngineRecord


RANGE_FORM = "MIN:OPT:MAX with 0 <= MIN <= OPT <= MAX"


def range_of(text: str) -> Range | None:
    """"1:4:8" -> (1, 4, 8); "8" -> (8, 8, 8); None when it is neither (see RANGE_FORM)."""
    try:
        values = tuple(int(p) for p in text.split(":"))
    except ValueError:
        return None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not 0 <= values[0] <= values[1] <= values[2]:
        return None
    return values  # type: ignore[return-value]


def parse_range(text: str, name: str) -> Range:
    """``range_of``, or a BuildError naming the option when TEXT is not a range."""
    values = range_of(text)
    if values is None:
        raise BuildError(f"bad --{name} range", given=text, expected=RANGE_FORM, hint=f"e.g. --{name} 1:1:4")
    return values


def profile_for(config: dict[str, Any], request: BuildRequest) -> ProfileSpec:
    """Requested ranges, defaults clipped to the model's context (max_position_embeddings)."""
    context = int(config.get("max_position_embeddings") or 1024)
    seq = request.seq or (1, min(64, context), min(256, context))
    past = request.past or (0, min(256, context - 1), max(context - 1, 0))
    return ProfileSpec(batch=request.batch or (1, 1, 4), seq=seq, past=past)


def mixport_node_counts(onnx_path: Path) -> dict[str, int]:
    """{"TopKRouting": n, "MoE": m}: the mixport nodes of the file's main graph."""
    from mixport.engine.network import load_onnx

    counts = Counter(n.op_type for n in load_onnx(onnx_path).graph.node if n.domain == DOMAIN)
    return {op: counts.get(op, 0) for op in (TOPK_ROUTING, MOE)}


def check_plugin_layers(result: BuildResult, nodes: dict[str, int]) -> None:
    """Every mixport node became one plugin layer (plugins on), or none did (plugins off)."""
    found = Counter(layer.plugin for layer in result.plugin_layers)
    expected = {f"{DOMAIN}::{op}": (n if result.use_plugins else 0) for op, n in nodes.items()}
    got = {name: found.get(name, 0) for name in expected}
    if got != expected or sum(found.values()) != sum(expected.values()):
        raise BuildError("the engine's plugin layers do not match the ONNX file's mixport nodes",
                         given=dict(found), expected=expected,
                         hint="a mixport node was inlined instead of becoming a plugin layer: "
                              "are the plugin_namespace attributes and creators in place?")


def _request_differences(record: EngineRecord, request: BuildRequest, targets: tuple[str, ...],
                         spec: ProfileSpec) -> list[str]:
    diffs = []
    if request.targets is not None and list(targets) != record.requested_targets:
        diffs.append(f"targets {','.join(targets)} (engine: {','.join(record.requested_targets)})")
    if request.use_plugins != record.use_plugins:
        diffs.append(f"plugins {'on' if request.use_plugins else 'off'} (engine: "
                     f"{'on' if record.use_plugins else 'off'})")
    for role in ("batch", "seq", "past"):
        if getattr(request, role) is not None and list(getattr(spec, role)) != record.ranges.get(role):
            diffs.append(f"{role} {getattr(spec, role)} (engine: {record.ranges.get(role)})")
    return diffs


def _existing(folder: Path, manifest: Manifest, trt: ModuleType, request: BuildRequest,
              targets: tuple[str, ...], spec: ProfileSpec) -> FolderBuild | None:
    """The up-to-date answer for an existing engine; BuildError when it must be forced."""
    record = manifest.engine
    if record is None or request.force:
        return None
    ok, reason = engine_status(folder, trt, manifest=manifest)
    if not ok:
        raise BuildError(f"{ENGINE_FILE} is stale: {reason}", given=str(folder),
                         hint=f"rebuild it: mixport build {folder} --force")
    diffs = _request_differences(record, request, targets, spec)
    if diffs:
        raise BuildError(f"{ENGINE_FILE} exists and was built with other options", given="; ".join(diffs),
                         hint=f"replace it: mixport build {folder} --force ...")
    return FolderBuild(folder, False, f"{ENGINE_FILE} is up to date ({reason})", record)


def engine_record(result: BuildResult, trt: ModuleType, onnx_sha: str, nodes: dict[str, int],
                  targets: tuple[str, ...], spec: ProfileSpec, folded: int, path: Path) -> EngineRecord:
    """The manifest's ``engine`` section for the engine now at PATH (hashed here, with its stamp)."""
    stamp = artifact.stamp(path)
    return EngineRecord(
        file=path.name, sha256=stamp.sha256, bytes=stamp.bytes, mtime_ns=stamp.mtime_ns,
        trt=result.trt, trt_flavor=flavor_of(trt), trt_version=str(getattr(trt, "__version__", "?")),
        targets=list(result.targets), requested_targets=list(targets), gpu_at_build=visible_gpu(),
        dtype=result.dtype, onnx_sha256=onnx_sha,
        ranges={"batch": list(spec.batch), "seq": list(spec.seq), "past": list(spec.past)},
        profiles={name: [list(s) for s in shapes] for name, shapes in result.profile.items()},
        use_plugins=result.use_plugins, mixport_nodes=nodes,
        plugin_layers=[{"name": layer.name, "plugin": layer.plugin} for layer in result.plugin_layers],
        plugin_layer_count=len(result.plugin_layers), folded_nodes=folded,
        build_seconds=round(result.seconds, 3), mixport_version=mixport.__version__)


def _check_dtype(request: BuildRequest, manifest: Manifest) -> str | None:
    if request.dtype is None:
        return None
    dtype = check_dtype(request.dtype)
    exported = manifest.dtype
    if exported and dtype != exported:
        raise BuildError("the requested dtype differs from the export's", given=dtype, expected=exported,
                         hint="the engine's precision is the ONNX file's: re-export with "
                              f"--dtype {dtype}, or drop --dtype")
    return dtype


def build_folder(folder: str | Path, request: BuildRequest | None = None, *,
                 trt_module: ModuleType | None = None,
                 progress: Callable[[str], None] | None = None) -> FolderBuild:
    """Build OUT_DIR/model.engine from OUT_DIR/model.onnx (unless up to date) and record it."""
    request, step = request or BuildRequest(), progress or (lambda _msg: None)
    folder = Path(folder)
    manifest = Manifest.read(folder)
    onnx_path = artifact.validate_folder(folder, manifest)
    dtype = _check_dtype(request, manifest)
    trt = trt_module or import_trt()
    targets = resolve_targets(trt, request.targets)
    spec = profile_for(manifest.config, request)
    spec.check()
    existing = _existing(folder, manifest, trt, request, targets, spec)
    if existing is not None:
        return existing
    onnx_sha, nodes = manifest.onnx_sha256 or artifact.file_sha256(onnx_path), mixport_node_counts(onnx_path)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=folder) as tmp, \
            artifact.atomic_write(folder / ENGINE_FILE) as engine_path:
        step("folding constants for TensorRT's parser")
        source, folded = prepare_for_parser(onnx_path, Path(tmp), request.use_plugins)
        step(f"building the engine for {', '.join(targets)}")
        result = build_engine(source, engine_path, dtype=dtype, targets=targets, profiles=spec,
                              use_plugins=request.use_plugins, trt_module=trt)
        check_plugin_layers(result, nodes)  # a wrong engine never replaces the folder's
    record = engine_record(result, trt, onnx_sha, nodes, targets, spec, folded, folder / ENGINE_FILE)
    dataclasses.replace(manifest, engine=record).write(folder)
    return FolderBuild(folder, True, f"built {folder / ENGINE_FILE} ({result.trt}, {len(result.plugin_layers)} "
                                     f"plugin layers, {result.seconds:.1f} s)", record)
