"""What ``mixport check`` compares, decided before anything heavy is loaded.

The check compares the ONNX file it is given with the folder's source model: the folder's
``model.onnx`` as it is now (when it changed since export, a note says so: the manifest's
hash guards the fast graph and the engine built from the exported file, not the check), or
another file (``--onnx PATH``) with the same inputs and outputs. The fast graph and the
engine stand for the exported ``model.onnx`` only; they are compared only when that is the
file checked, and the check never rebuilds them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixport import artifact, ops
from mixport.artifact import Manifest, TensorSig
from mixport.errors import CheckUnavailable


@dataclass(frozen=True)
class CheckTarget:
    """The ONNX file to compare, the notes about it, and why the folder's fast graph and engine
    are not compared with it (None: they were built from this very file)."""

    path: Path
    notes: list[str] = field(default_factory=list)
    not_derived: str | None = None
    routers: int | None = None  # TopKRouting nodes of an --onnx file (None: the export's own file)


def positions_needed(steps: int, prompt_len: int) -> int:
    """Positions a check uses: the prompt, then one per decode step."""
    return prompt_len + steps


def require_steps(manifest: Manifest, steps: int, prompt_len: int) -> None:
    """One line (before anything is loaded) for a step count no check can run."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise CheckUnavailable("the number of decode steps must be a whole number >= 0", given=repr(steps),
                               expected="--steps 0 or more")
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or prompt_len < 1:
        raise CheckUnavailable("the check's prompt length must be a whole number >= 1", given=repr(prompt_len),
                               expected="1 or more tokens")
    context = manifest.config.get("max_position_embeddings")
    if isinstance(context, int) and not isinstance(context, bool) and context > 0:
        need = positions_needed(steps, prompt_len)
        if need > context:
            most = context - prompt_len
            raise CheckUnavailable(
                "the check would run beyond the model's context",
                given=f"{prompt_len} prompt tokens + {steps} decode steps = {need} positions",
                expected=f"at most {context} (max_position_embeddings)",
                hint=f"--steps {max(most, 0)} or fewer" if most >= 0 else None)


def changed_since_export(folder: Path, manifest: Manifest) -> list[str]:
    """The files among model.onnx / model.onnx.data whose content differs from the manifest's hash."""
    changed = []
    for name, sha in ((artifact.MODEL_FILE, manifest.onnx_sha256), (artifact.DATA_FILE, manifest.data_sha256)):
        path = folder / name
        if sha is not None and path.is_file() and artifact.verify(path, sha, manifest.stamps.get(name)) is None:
            changed.append(name)
    return changed


def resolve(folder: Path, manifest: Manifest, onnx_path: Path | None = None) -> CheckTarget:
    """The file ``mixport check`` compares (see the module docstring); one line when it cannot."""
    folder = Path(folder)
    if onnx_path is not None:
        return _other_file(folder, manifest, Path(onnx_path))
    changed = changed_since_export(folder, manifest)
    # the folder's own checks (a newer mixport, a missing model.onnx or weights file), less the changed hashes
    path = artifact.validate_folder(folder, dataclasses.replace(
        manifest, onnx_sha256=None if artifact.MODEL_FILE in changed else manifest.onnx_sha256,
        data_sha256=None if artifact.DATA_FILE in changed else manifest.data_sha256))
    if not changed:
        return CheckTarget(path)
    files = " and ".join(changed)
    note = (f"{files} changed since export (the manifest's sha256 differs): comparing the file as it is now "
            "with the source model")
    return CheckTarget(path, [note], not_derived=f"{files} changed since export; the fast graph and the engine "
                                                 "stand for the exported file (the check does not rebuild them)")


def _other_file(folder: Path, manifest: Manifest, path: Path) -> CheckTarget:
    """``--onnx PATH``: a readable ONNX file with the export's inputs and outputs."""
    import onnx

    artifact.validate_folder(folder, dataclasses.replace(manifest, onnx_sha256=None, data_sha256=None))
    if not path.is_file():
        raise CheckUnavailable("the ONNX file to check was not found", given=str(path), expected="an .onnx file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types  # noqa: BLE001
        raise CheckUnavailable("the file to check is not a readable ONNX model", given=str(path),
                               expected="an .onnx file", hint=_first_line(exc)) from None
    want = _export_signature(folder, manifest)
    problem = signature_problem(want, artifact.io_signature(proto))
    if problem is not None:
        raise CheckUnavailable(f"{path.name} does not have the export's inputs and outputs: {problem}",
                               given=str(path), expected=f"the I/O signature of {folder / artifact.MODEL_FILE}",
                               hint="--onnx compares another export of the same model")
    routers = sum(1 for n in proto.graph.node if n.domain == ops.DOMAIN and n.op_type == ops.TOPK_ROUTING)
    source = manifest.source.path or f"built-in {manifest.source.builtin}"
    note = f"comparing {path} with the source model of {folder} ({source})"
    return CheckTarget(path, [note], not_derived=f"--onnx {path.name} is checked; the folder's fast graph and engine "
                                                 "stand for its model.onnx",
                       routers=routers)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _export_signature(folder: Path, manifest: Manifest) -> dict[str, list[TensorSig]]:
    if manifest.inputs and manifest.outputs:
        return {"inputs": manifest.inputs, "outputs": manifest.outputs}
    import onnx  # a manifest from before the signature was recorded: read it from model.onnx

    return artifact.io_signature(onnx.load(str(folder / artifact.MODEL_FILE), load_external_data=False))


def signature_problem(want: dict[str, list[TensorSig]], got: dict[str, list[TensorSig]]) -> str | None:
    """The first difference between two I/O signatures (names, element types, ranks, fixed sizes;
    a symbolic dim matches any symbolic dim), or None."""
    for kind in ("inputs", "outputs"):
        mine, theirs = {s.name: s for s in want[kind]}, {s.name: s for s in got[kind]}
        what = kind[:-1]
        missing = [n for n in mine if n not in theirs]
        if missing:
            return f"no {what} {missing[0]!r}"
        extra = [n for n in theirs if n not in mine]
        if extra:
            return f"an extra {what} {extra[0]!r}"
        for name, sig in mine.items():
            other = theirs[name]
            if other.dtype != sig.dtype:
                return f"{what} {name!r} is {other.dtype}, the export's is {sig.dtype}"
            if not _same_shape(sig.shape, other.shape):
                return f"{what} {name!r} has shape {_shown(other.shape)}, the export's is {_shown(sig.shape)}"
    return None


def _same_shape(a: list[Any], b: list[Any]) -> bool:
    if len(a) != len(b):
        return False
    return all((isinstance(x, str) and isinstance(y, str)) or x == y for x, y in zip(a, b, strict=True))


def _shown(shape: list[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
