"""The export folder: its file names, its typed ``manifest.json``, and how files get into it.

An export is written into a temporary sibling and renamed into place at the end
(``staging_dir``): an interrupted export leaves at most a hidden ``.OUT_DIR.tmp-*``
folder (removed by the next export to OUT_DIR; ``mixport.staging``), never an OUT_DIR that
looks complete, and ``--force`` replaces only an empty folder or one mixport wrote. A file written into an existing
folder later (manifest, engine, fast graph) goes through ``atomic_write``: readers
see the old file or the new one, never half of one. ``manifest.json`` is the
folder's table of contents (``Manifest``); every stage reads it through this module.

    manifest = Manifest.read(folder)          # RuntimeFailure when missing, malformed or too new
    model = validate_folder(folder, manifest)  # model.onnx (+ .data) as exported and described (folder_check)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

import mixport
from mixport import config_fields, folder_check, staging, typed_json
from mixport.errors import MixportError, OutputExistsError, RuntimeFailure, TokenizerError
from mixport.staging import atomic_write

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # the weights, when model.onnx would pass protobuf's 2 GB limit
ENGINE_FILE = "model.engine"  # `mixport build`
TWO_GB = 2**31 - 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.model", "chat_template.jinja")
TRACED_DATA = ".traced.onnx.data"  # the traced weights (exporter.trace)
FUSED_DATA = ".fused.data"  # the passes' new big tensors: stacked experts (passes.run_passes)
WORK_FILES = (TRACED_DATA, FUSED_DATA)  # weights of the graph while it is worked on
MANIFEST_VERSION = 1  # manifest.json's schema; a manifest without "version" is 0 (read the same way)


# ---- writing files ----------------------------------------------------------------------------

def check_target(out_dir: Path, force: bool, sources: Iterable[Path] = ()) -> None:
    """Refuse an OUT_DIR an export must not write, before anything is touched: one that is a
    source folder, inside one or holds one (symlinks resolved), an existing path without
    ``force``, and even with ``force`` anything but an empty folder or a folder mixport wrote
    (its manifest.json parses as a mixport manifest): --force never deletes other data."""
    out = Path(out_dir).absolute()
    for src in sources:
        if staging.inside(out, Path(src)) or staging.inside(Path(src), out):
            raise OutputExistsError("the output folder is the source folder, inside it or holds it",
                                    given=f"-o {out} with the source {Path(src).absolute()}",
                                    expected="an output folder apart from the source",
                                    hint="choose another -o (writing there could destroy the source)")
    if os.path.lexists(out):
        _check_replaceable(out, force)
    staging.check_writable(out)  # its folder: a new folder (or the renames) can be made there


def _check_replaceable(out: Path, force: bool) -> None:
    if not force:
        raise OutputExistsError("the output folder already exists", given=str(out),
                                expected="a new path", hint="pass --force to replace it")
    if not out.is_dir():
        raise OutputExistsError("the output path is not a folder, and --force replaces only export folders",
                                given=str(out), expected="a new path, an empty folder or a mixport export folder",
                                hint="choose another -o, or remove it yourself")
    if any(out.iterdir()) and not _written_by_mixport(out):
        raise OutputExistsError("--force replaces only a folder mixport wrote, and this one has files but no "
                                f"mixport {MANIFEST}", given=str(out),
                                expected="a new path, an empty folder or a mixport export folder",
                                hint="choose another -o, or remove the folder yourself")


def _written_by_mixport(folder: Path) -> bool:
    """Does FOLDER hold a manifest.json that mixport wrote (a JSON object naming a mixport version)?
    A damaged manifest still counts: ``--force`` is how such a folder gets exported again."""
    try:
        data = json.loads((folder / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "mixport_version" in data


@contextlib.contextmanager
def staging_dir(out_dir: Path, force: bool, sources: Iterable[Path] = (),
                notice: staging.Notice | None = None) -> Iterator[Path]:
    """Yield a temp folder beside OUT_DIR; on success it replaces OUT_DIR, on error it vanishes.

    OUT_DIR is checked (``check_target``) before and again at the end, the staging folders of
    exports to OUT_DIR that were killed are removed first (``notice`` hears of each), and the
    folder gets the mode any new folder gets (the umask's)."""
    out_dir = Path(out_dir).absolute()
    sources = list(sources)
    check_target(out_dir, force, sources)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging.remove_stale(out_dir, notice)
    tmp = staging.make(out_dir)
    try:
        yield tmp
        check_target(out_dir, force, sources)  # again: minutes passed
        staging.publish_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_onnx(proto: onnx.ModelProto, path: Path, weights_dir: Path | None = None,
              on_tensor: Callable[[int, int], None] | None = None, work_dir: Path | None = None) -> list[str]:
    """Write PATH; its weights go to PATH.data when the file would pass protobuf's 2 GB limit.
    ``weights_dir`` resolves initializers that point to files (external data; ``work_dir``: where
    the passes' work file is, default ``weights_dir``): they are copied into PATH (or PATH.data)
    a tensor at a time. Returns the names of the files written."""
    from mixport import onnx_io  # onnx_ir (and sympy) only when writing: refusals stay quick

    files = None if weights_dir is None else onnx_io.WeightFiles(
        Path(weights_dir), Path(work_dir or weights_dir) / FUSED_DATA)
    return onnx_io.write_model(proto, Path(path), files, TWO_GB, on_tensor)


def save_model(proto: onnx.ModelProto, folder: Path, weights_dir: Path | None = None,
               on_tensor: Callable[[int, int], None] | None = None) -> list[str]:
    """Write model.onnx (+ model.onnx.data past 2 GB) into FOLDER."""
    return save_onnx(proto, Path(folder) / MODEL_FILE, weights_dir, on_tensor)


def remove_work_files(folder: Path) -> None:
    for name in WORK_FILES:
        (Path(folder) / name).unlink(missing_ok=True)


def resolves_inside(path: Path, folder: Path) -> bool:
    """Does PATH, symlinks resolved, lie strictly inside FOLDER? A Hugging Face cache snapshot
    (``REPO/snapshots/REV``) may also link into its own ``REPO/blobs`` (a resolved path lies
    under ``REPO/blobs`` only when that is a real folder, not a link)."""
    root, real = Path(os.path.realpath(folder)), Path(os.path.realpath(path))
    roots = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    return any(real != r and real.is_relative_to(r) for r in roots)


def tokenizer_path(folder: Path, name: str) -> Path | None:
    """FOLDER/NAME with symlinks resolved, None when absent; TokenizerError unless it is a regular file
    inside FOLDER (``resolves_inside``: a hub cache snapshot's blobs included)."""
    path = Path(folder) / name
    if not path.is_symlink() and not path.exists():
        return None
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling or looping link
        raise TokenizerError(f"{name} is a broken link", given=str(path), expected="a file in the folder") from None
    if not resolves_inside(real, folder):
        raise TokenizerError(f"{name} points outside the model folder", given=f"{path} -> {real}",
                             expected=f"a file inside {Path(folder).resolve()}",
                             hint="copy the file into the folder") from None
    if not real.is_file():
        raise TokenizerError(f"{name} is not a regular file", given=str(real), expected="a file")
    return real


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy SRC's tokenizer files into DST (their contents: a link is resolved, never copied, and
    must stay inside SRC, see ``tokenizer_path``); returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        real = tokenizer_path(src, name)
        if real is not None:
            shutil.copyfile(real, Path(dst) / name)
            copied.append(name)
    return copied


# ---- checking files ---------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Stamp:
    """A file as last verified: its sha256 and the size and mtime it had then. While both are
    unchanged the sha256 is trusted without reading the file, so a multi-GB file is hashed once
    (as make and git trust them: bytes changed in place with size and mtime put back go unseen)."""

    sha256: str
    bytes: int
    mtime_ns: int | None = None  # None: not recorded (the file is hashed every time)


def stamp(path: Path) -> Stamp:
    """PATH's stamp now (PATH is hashed)."""
    digest = file_sha256(path)
    st = Path(path).stat()
    return Stamp(digest, st.st_size, st.st_mtime_ns)


def verify(path: Path, sha256: str, known: Stamp | None = None) -> Stamp | None:
    """PATH's stamp when its content has ``sha256``, else None. PATH is read only when ``known``
    (its stamp when last verified) does not vouch for it: another sha256, size or mtime."""
    st = Path(path).stat()
    if known is not None and known.sha256 == sha256:
        if known.bytes != st.st_size:
            return None
        if known.mtime_ns == st.st_mtime_ns:
            return known
    if file_sha256(path) != sha256:
        return None
    return Stamp(sha256, st.st_size, st.st_mtime_ns)


def stamps_of(folder: Path, names: list[str]) -> dict[str, Stamp]:
    """{name: stamp} of FOLDER's model.onnx and model.onnx.data among ``names`` (for the manifest)."""
    return {name: stamp(Path(folder) / name) for name in (MODEL_FILE, DATA_FILE) if name in names}


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:3] if x.isdigit())


def validate_folder(folder: Path, manifest: Manifest) -> Path:
    """The folder's model.onnx, after checking the manifest describes it and its weights file."""
    folder = Path(folder)
    if _version_tuple(manifest.mixport_version) > _version_tuple(mixport.__version__):
        raise RuntimeFailure("the folder was exported by a newer mixport", given=manifest.mixport_version,
                             expected=f"<= {mixport.__version__}", hint="pip install -U mixport")
    folder_check.check_config(manifest.config, str(folder / MANIFEST))
    path = folder / MODEL_FILE
    if not path.is_file():
        raise RuntimeFailure("the export folder has no model.onnx", given=str(folder),
                             expected="model.onnx beside manifest.json", hint="export again")
    fresh = {}
    for name, sha in ((MODEL_FILE, manifest.onnx_sha256), (DATA_FILE, manifest.data_sha256)):
        if sha is None:  # a manifest from before data_sha256 (or one without data): nothing to check
            continue
        if not (folder / name).is_file():
            raise RuntimeFailure(f"the export folder has no {name}", given=str(folder),
                                 expected=f"{name} beside manifest.json (the model's weights)", hint="export again")
        now = verify(folder / name, sha, manifest.stamps.get(name))
        if now is None:
            raise RuntimeFailure(f"{name} does not match the manifest (changed after export?)",
                                 given=str(folder / name), expected=f"sha256 {sha[:12]}...",
                                 hint=f"export again, or restore the original {name}")
        if now != manifest.stamps.get(name):
            fresh[name] = now
    _check_graph(folder, manifest, deep=manifest.onnx_sha256 is None or MODEL_FILE in fresh)
    if fresh:  # same content, new mtime (a copy): remember it, so the next run does not hash again
        refresh(folder, lambda m: dataclasses.replace(m, stamps={
            **m.stamps, **{n: s for n, s in fresh.items() if s.sha256 in (m.onnx_sha256, m.data_sha256)}}))
    return path


def _check_graph(folder: Path, manifest: Manifest, deep: bool) -> None:
    """model.onnx's signature is what the manifest describes; ``deep`` (just hashed, or no hash):
    parsed whole too, without weights, and checked by onnx."""
    path = folder / MODEL_FILE
    proto = folder_check.read_graph(path) if deep else folder_check.read_signature(path)
    recorded = {"inputs": manifest.inputs, "outputs": manifest.outputs}
    signature = io_signature(proto)
    folder_check.check_graph(proto, manifest.config, manifest.dtype, str(folder / MANIFEST),
                             {part: (recorded[part], sig) for part, sig in signature.items()})
    if manifest.cache and manifest.cache != cache_record(proto):
        raise RuntimeFailure("manifest.json disagrees with model.onnx on cache", given=f"{folder / MANIFEST}: cache "
                             f"{typed_json.shown(manifest.cache)}", expected="model.onnx's past_key_values.* dims",
                             hint="export the folder again (mixport export ... --force)")


# ---- manifest.json ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """Where the export came from: a Hugging Face folder, or a built-in model and its seed."""

    path: str | None = None
    builtin: str | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # fields this mixport does not know (kept)


@dataclass(frozen=True)
class TensorSig:
    """One graph input or output: its name, element type ("float", "int64"...) and shape."""

    name: str
    dtype: str
    shape: list[int | str]  # symbolic dims by name


@dataclass(frozen=True)
class EngineRecord:
    """The manifest's ``engine`` section, written by ``mixport build`` (engine.folder)."""

    file: str = ENGINE_FILE
    sha256: str = ""
    bytes: int = -1
    mtime_ns: int | None = None  # with bytes: while unchanged, sha256 is trusted (engine.status)
    trt: str = "another TensorRT"  # e.g. "TensorRT-RTX 1.7.1.116 (tensorrt_rtx_bindings)"
    trt_flavor: str | None = None
    trt_version: str | None = None
    targets: list[str] = field(default_factory=list)
    requested_targets: list[str] = field(default_factory=list)
    gpu_at_build: str | None = None
    dtype: str | None = None
    onnx_sha256: str | None = None  # the model.onnx it was built from
    ranges: dict[str, list[int]] = field(default_factory=dict)  # batch/seq/past -> [min, opt, max]
    profiles: dict[str, list[list[int]]] = field(default_factory=dict)  # input -> [min, opt, max] shapes
    use_plugins: bool = True
    mixport_nodes: dict[str, int] = field(default_factory=dict)
    plugin_layers: list[dict[str, str]] = field(default_factory=list)
    plugin_layer_count: int = 0
    folded_nodes: int = 0
    build_seconds: float = 0.0
    mixport_version: str = "0"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stamp(self) -> Stamp:
        return Stamp(self.sha256, self.bytes, self.mtime_ns)


@dataclass(frozen=True)
class QuantRecord:
    """The manifest's ``quantization`` section (``mixport/quant.py``): how the weights were quantized."""

    bits: int  # 8 | 4
    block_size: int
    symmetric: bool = True  # False: uint4 with zero points
    lm_head: bool = False  # was lm_head quantized too
    scheme: str = ""  # int8 | int4 | int4-zp
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OrtGraphRecord:
    """The manifest's ``ort_graph`` section: the fast ONNX Runtime graph (runtime.ort_graph)."""

    file: str
    version: int
    sha256: str
    source_onnx_sha256: str | None = None
    signature: str | None = None
    external_data: bool = False
    bytes: int = -1
    mtime_ns: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stamp(self) -> Stamp:
        return Stamp(self.sha256, self.bytes, self.mtime_ns)


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``: what the folder holds, what it was made from, and how to check it.

    Frozen: change a copy (``dataclasses.replace``) and ``write`` it. Defaults are what a
    manifest written before a field existed means."""

    config: dict[str, Any]  # the model's config (MoEConfig fields)
    dtype: str = "fp32"
    mixport_version: str = "0"
    source: Source = field(default_factory=Source)
    config_sha256: str | None = None
    opset: int | None = None
    onnx_sha256: str | None = None  # model.onnx; engines and fast graphs name their source by it
    data_sha256: str | None = None  # model.onnx.data, when the weights live apart (past 2 GB)
    stamps: dict[str, Stamp] = field(default_factory=dict)  # model.onnx(.data) when last verified
    fused: bool = False
    passes: dict[str, int] = field(default_factory=dict)  # pass -> rewrites
    target: str | None = None  # the passes' target ("portable"); None when not fused
    files: list[str] = field(default_factory=list)
    inputs: list[TensorSig] = field(default_factory=list)
    outputs: list[TensorSig] = field(default_factory=list)
    engine: EngineRecord | None = None
    ort_graph: OrtGraphRecord | None = None
    quantization: QuantRecord | None = None  # None: float weights
    cache: dict[str, list[int | str]] = field(default_factory=dict)  # each past_key_values.* input -> its dims
    #   ["batch", heads, "past_seq", width] (present.* alike, with total_seq); {}: written before the record,
    #   every tensor [batch, num_key_value_heads, past, head_dim] (``cache_shapes``)
    version: int = MANIFEST_VERSION  # as read (0: before versions); always written as MANIFEST_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # fields this mixport does not know (kept)

    @classmethod
    def from_dict(cls, data: object, where: str = MANIFEST) -> Manifest:
        """A Manifest from parsed JSON; RuntimeFailure (one line) when malformed or too new."""
        if not isinstance(data, dict):
            raise _malformed(where, "the top level", typed_json.shown(data), "a JSON object")
        version = data.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise _malformed(where, "version", typed_json.shown(version), "an integer >= 0")
        if version > MANIFEST_VERSION:
            raise RuntimeFailure(f"{MANIFEST} is of a newer format than this mixport reads",
                                 given=f"{where}: version {version}", expected=f"<= {MANIFEST_VERSION}",
                                 hint="pip install -U mixport")
        manifest = typed_json.build(cls, {**data, "version": version}, "", where, _malformed)
        for name, record in (("engine", manifest.engine), ("ort_graph", manifest.ort_graph)):
            if record is not None and not is_plain_name(record.file):
                raise _malformed(where, f"{name}.file", typed_json.shown(record.file),
                                 "a plain file name inside the export folder (no '/', no '..')")
        return manifest

    def cache_shapes(self) -> list[tuple[int, int]]:
        """(heads, width) of each cache tensor, in input order past_key_values.0.key, .0.value, .1.key ...:
        from the ``cache`` record, else (a manifest written before it) from the config."""
        layers = int(self.config["num_hidden_layers"])
        if not self.cache:
            key, value = config_fields.cache_dims(self.config)
            return [key, value] * layers
        shapes = []
        for name in cache_names(layers):
            dims = self.cache.get(name)
            if dims is None or len(dims) != 4 or not all(isinstance(d, int) for d in (dims[1], dims[3])):
                raise RuntimeFailure("manifest.json is malformed", given=f"cache.{name} is {typed_json.shown(dims)}",
                                     expected='["batch", heads, "past_seq", width]', hint="export the folder again")
            shapes.append((int(dims[1]), int(dims[3])))
        return shapes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; fields that are None are left out (read back as None)."""
        return {"version": MANIFEST_VERSION, **{k: v for k, v in typed_json.plain(self).items() if k != "version"}}

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise RuntimeFailure("not a mixport export folder (no manifest.json)", given=str(folder),
                                 expected="a folder written by `mixport export`")
        try:
            data = json.loads(path.read_text())
        except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, an int of 4300+ digits, deep nesting
            raise RuntimeFailure("manifest.json is not valid JSON", given=f"{path}: {str(exc)[:200]}",
                                 expected="the manifest `mixport export` wrote") from None
        return cls.from_dict(data, str(path))

    def write(self, folder: Path) -> None:
        """Write FOLDER/manifest.json atomically: readers never see half of it."""
        with atomic_write(Path(folder) / MANIFEST) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def refresh(folder: Path, change: Callable[[Manifest], Manifest]) -> None:
    """Best effort: re-read FOLDER's manifest, apply ``change`` and write it back when it changed.
    For caches (stamps): a read-only folder or a damaged manifest only costs a rehash next time."""
    with contextlib.suppress(OSError, MixportError):
        current = Manifest.read(folder)
        new = change(current)
        if new != current:
            new.write(folder)


def io_signature(proto: onnx.ModelProto) -> dict[str, list[TensorSig]]:
    def describe(vi: onnx.ValueInfoProto) -> TensorSig:
        t = vi.type.tensor_type
        return TensorSig(vi.name, onnx.TensorProto.DataType.Name(t.elem_type).lower(),
                         [d.dim_param or d.dim_value for d in t.shape.dim])
    return {"inputs": [describe(v) for v in proto.graph.input],
            "outputs": [describe(v) for v in proto.graph.output]}


def cache_names(layers: int) -> list[str]:
    """The past_key_values.* inputs of a model with ``layers`` decoder layers, in the graph's order."""
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def cache_record(proto: onnx.ModelProto) -> dict[str, list[int | str]]:
    """The manifest's ``cache`` record: each past_key_values.* input of PROTO -> its dims."""
    return {sig.name: sig.shape for sig in io_signature(proto)["inputs"] if sig.name.startswith("past_key_values.")}


def is_plain_name(name: str) -> bool:
    """Is ``name`` one file name in a folder: no separator, not '.', '..', empty or NUL?"""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def folder_file(folder: Path, name: str) -> Path:
    """FOLDER/NAME for a file the manifest names, after checking NAME is a plain file name and
    the path (symlinks resolved) stays inside FOLDER; RuntimeFailure (one line) otherwise."""
    path = Path(folder) / name
    root = os.path.realpath(folder)
    if not is_plain_name(name) or not os.path.realpath(path).startswith(root.rstrip(os.sep) + os.sep):
        raise RuntimeFailure(f"{MANIFEST} names a file outside the export folder", given=f"{folder}: {name!r}",
                             expected="a plain file name inside the folder (no '/', '..' or symlink out)",
                             hint="export and build the folder again")
    return path


def _malformed(where: str, name: str, shown: str, expected: str) -> RuntimeFailure:
    return RuntimeFailure(f"{MANIFEST} is malformed", given=f"{where}: {name} is {shown}", expected=expected,
                          hint="export the folder again (mixport export ... --force)")
