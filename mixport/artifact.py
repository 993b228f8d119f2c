"""The export folder: written into a temporary sibling, renamed into place at the end.

An interrupted export leaves at most a hidden ``.OUT_DIR.tmp-*`` folder, never an
OUT_DIR that looks complete. ``manifest.json`` is the folder's table of contents.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx

import mixport
from mixport import onnx_io
from mixport.errors import OutputExistsError, RuntimeFailure

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TWO_GB = 2**31 - 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.model", "chat_template.jinja")


def check_target(out_dir: Path, force: bool) -> None:
    if Path(out_dir).exists() and not force:
        raise OutputExistsError("the output folder already exists", given=str(Path(out_dir).absolute()),
                                expected="a new path", hint="pass --force to replace it")


@contextlib.contextmanager
def staging_dir(out_dir: Path, force: bool) -> Iterator[Path]:
    """Yield a temp folder beside OUT_DIR; on success it replaces OUT_DIR, on error it vanishes."""
    out_dir = Path(out_dir).absolute()
    check_target(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_onnx(proto: onnx.ModelProto, path: Path, weights_dir: Path | None = None,
              on_tensor: Callable[[int, int], None] | None = None, work_dir: Path | None = None) -> list[str]:
    """Write PATH; its weights go to PATH.data when the file would pass protobuf's 2 GB limit.
    ``weights_dir`` resolves initializers that point to files (external data; ``work_dir``: where
    the passes' work file is, default ``weights_dir``): they are copied into PATH (or PATH.data)
    a tensor at a time. Returns the names of the files written."""
    files = None if weights_dir is None else onnx_io.WeightFiles(
        Path(weights_dir), Path(work_dir or weights_dir) / FUSED_DATA)
    return onnx_io.write_model(proto, Path(path), files, TWO_GB, on_tensor)


def save_model(proto: onnx.ModelProto, folder: Path, weights_dir: Path | None = None,
               on_tensor: Callable[[int, int], None] | None = None) -> list[str]:
    """Write model.onnx (+ model.onnx.data past 2 GB) into FOLDER."""
    return save_onnx(proto, Path(folder) / MODEL_FILE, weights_dir, on_tensor)


TRACED_DATA = ".traced.onnx.data"  # the traced weights (exporter.trace)
FUSED_DATA = ".fused.data"  # the passes' new big tensors: stacked experts (passes.run_passes)
WORK_FILES = (TRACED_DATA, FUSED_DATA)  # weights of the graph while it is worked on


def remove_work_files(folder: Path) -> None:
    for name in WORK_FILES:
        (Path(folder) / name).unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, dst / name)
            copied.append(name)
    return copied


def io_signature(proto: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    def describe(vi: onnx.ValueInfoProto) -> dict[str, Any]:
        t = vi.type.tensor_type
        return {"name": vi.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower(),
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}
    return {"inputs": [describe(v) for v in proto.graph.input],
            "outputs": [describe(v) for v in proto.graph.output]}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json atomically (temp file + os.replace): readers never see half of it."""
    path = Path(folder) / MANIFEST
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(manifest, indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        set_default_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def set_default_mode(path: Path) -> None:
    """rw for everyone the umask allows (mkstemp creates 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise RuntimeFailure("not a mixport export folder (no manifest.json)", given=str(folder),
                             expected="a folder written by `mixport export`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RuntimeFailure("manifest.json is not valid JSON", given=f"{path}: {exc}",
                             expected="the manifest `mixport export` wrote") from None


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:3] if x.isdigit())


def validate_folder(folder: Path, manifest: dict[str, Any]) -> Path:
    """The folder's model.onnx, after checking the manifest describes it."""
    made_by = str(manifest.get("mixport_version", "0"))
    if _version_tuple(made_by) > _version_tuple(mixport.__version__):
        raise RuntimeFailure("the folder was exported by a newer mixport", given=made_by,
                             expected=f"<= {mixport.__version__}", hint="pip install -U mixport")
    path = folder / MODEL_FILE
    if not path.is_file():
        raise RuntimeFailure("the export folder has no model.onnx", given=str(folder),
                             expected="model.onnx beside manifest.json", hint="export again")
    if "onnx_sha256" in manifest and file_sha256(path) != manifest["onnx_sha256"]:
        raise RuntimeFailure("model.onnx does not match the manifest (changed after export?)",
                             given=str(path), expected=f"sha256 {manifest['onnx_sha256'][:12]}...",
                             hint="export again, or restore the original model.onnx")
    return path
