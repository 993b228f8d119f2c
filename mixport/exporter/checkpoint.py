"""Read a Hugging Face folder's safetensors (never pickles) into mixport names (the family
adapter's checkpoint rules)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mixport import artifact
from mixport.errors import CheckpointError
from mixport.exporter import mxfp4
from mixport.models import Adapter, MoEConfig, registry
from mixport.models.adapter import TRANSPOSE

INDEX = "model.safetensors.index.json"


# safetensors dtype -> bytes per element (the format's own table); BOOL is known but refused
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
# values read, converted and summed at once: 64 MB in fp32, past glibc's 32 MB mmap threshold, so each
# chunk goes back to the system when freed (smaller ones stay in the heap, fragmented)
READ_CHUNK = 1 << 24


def _bad_index(index: Path, why: str, given: object) -> CheckpointError:
    return CheckpointError(f"malformed safetensors index: {why}", given=f"{index.name}: {given}",
                           expected="a JSON object whose 'weight_map' maps tensor names to shard file names "
                                    "beside the index")


def _shard(model_dir: Path, name: object, index: Path) -> Path:
    """The index's shard NAME as a path inside ``model_dir``, checked before it is opened."""
    if not isinstance(name, str) or not name:
        raise _bad_index(index, "a shard name is not a file name", repr(name)[:80])
    if os.path.isabs(name) or "\\" in name or "\0" in name or ".." in name.split("/"):
        raise CheckpointError("the safetensors index names a shard outside the model folder",
                              given=f"{index.name}: {name!r}", expected="a relative file name inside the folder",
                              hint="a folder's weights are read only from the folder itself")
    path = model_dir / name
    if path.exists() and not artifact.resolves_inside(path, model_dir):
        raise CheckpointError("a shard is a symlink that resolves outside the model folder",
                              given=f"{name} -> {os.path.realpath(path)}", expected="a file inside the folder",
                              hint="copy the shard into the folder")
    return path


def safetensors_files(model_dir: Path) -> list[Path]:
    """The folder's weight files: sharded via the index, else every *.safetensors; every one a
    file inside the folder (no '..', absolute path or symlink out), checked before it is opened."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX
    if index.is_file():
        try:
            data = json.loads(index.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError("unreadable safetensors index", given=f"{index}: {exc!r}",
                                  expected="a JSON object with a 'weight_map'") from None
        if not isinstance(data, dict) or "weight_map" not in data:
            raise _bad_index(index, "no 'weight_map'", "a JSON object without it" if isinstance(data, dict)
                             else f"a JSON {type(data).__name__}")
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise _bad_index(index, "'weight_map' is not an object", f"a JSON {type(weight_map).__name__}")
        files = sorted({_shard(model_dir, name, index) for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError("the safetensors index names shards that are missing",
                                  given=", ".join(missing), expected="every shard beside the index")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        outside = [f.name for f in files if not artifact.resolves_inside(f, model_dir)]
        if outside:
            raise CheckpointError("a weight file is a symlink that resolves outside the model folder",
                                  given=", ".join(outside), expected="files inside the folder",
                                  hint="copy the file into the folder")
        return files
    if list(model_dir.glob("pytorch_model*.bin")) or list(model_dir.glob("*.pt")):
        raise CheckpointError("the folder holds only pickled weights (pytorch_model*.bin), which mixport "
                              "never loads", given=str(model_dir), expected="*.safetensors",
                              hint="convert once in a trusted environment: "
                                   "AutoModelForCausalLM.from_pretrained(d).save_pretrained(d, "
                                   "safe_serialization=True)")
    raise CheckpointError("no weights in the model folder", given=str(model_dir),
                          expected="model.safetensors or sharded model-*.safetensors + " + INDEX)


def _bad_header(path: Path, why: str, given: object, expected: str) -> CheckpointError:
    return CheckpointError(f"malformed safetensors header: {why}", given=f"{path.name}: {given}",
                           expected=expected, hint="the file is damaged or not a safetensors file; download it again")


def check_safetensors(path: Path) -> None:
    """Validate the header, every tensor's entry (dtype, shape, offsets matching the shape,
    spans in the file and not overlapping) and that the data is all there (truncation)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError("safetensors file too short for a header", given=f"{path} ({size} bytes)",
                                  expected="an 8-byte header length + JSON header + data")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError("safetensors header runs past the end of the file (truncated?)",
                                  given=f"{path}: header {n} bytes, file {size} bytes",
                                  expected="a complete file", hint="download or copy it again")
        if n > HEADER_LIMIT:
            raise _bad_header(path, "the header is too large", f"{n} bytes", f"at most {HEADER_LIMIT} bytes")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise CheckpointError("safetensors header is not valid JSON", given=str(path),
                                  expected="a safetensors file") from None
    if not isinstance(header, dict):
        raise _bad_header(path, "not a JSON object", f"a JSON {type(header).__name__}",
                          "{tensor name: {dtype, shape, data_offsets}}")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad_header(path, "'__metadata__' is not a map of strings", repr(metadata)[:80],
                          "a JSON object of string values")
    spans = sorted(_span(path, name, entry) + (name,) for name, entry in header.items() if name != "__metadata__")
    data_bytes = size - 8 - n
    for (start, end, name), following in zip(spans, spans[1:], strict=False):  # each with the next one
        if following[0] < end:
            raise _bad_header(path, "two tensors' bytes overlap", f"{name} [{start}, {end}) and {following[2]} "
                              f"[{following[0]}, {following[1]})", "disjoint data_offsets")
    ends = [end for _start, end, _name in spans]
    if ends and max(ends) > data_bytes:
        raise CheckpointError("safetensors file is truncated", given=f"{path}: {size} bytes",
                              expected=f"{max(ends) + 8 + n} bytes as its header declares",
                              hint="download or copy it again")


def _span(path: Path, name: str, entry: object) -> tuple[int, int]:
    """(start, end) of one tensor's bytes, after checking its entry: a known non-bool dtype, a
    shape of non-negative integers, and data_offsets [start, end] spanning exactly its bytes."""
    if not isinstance(entry, dict):
        raise _bad_header(path, f"tensor '{name}' is not an object", repr(entry)[:80],
                          "{dtype, shape, data_offsets}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype == "BOOL":
        raise CheckpointError(f"tensor '{name}' is of bool dtype", given=f"{path.name}: {name} BOOL",
                              expected="floating-point weights (F32, F16, BF16...)",
                              hint="mixport reads model weights; a bool tensor is not one")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise _bad_header(path, f"tensor '{name}' has an unknown dtype", repr(dtype)[:40],
                          ", ".join(d for d in DTYPE_SIZES if d != "BOOL"))
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _bad_header(path, f"tensor '{name}' has a malformed shape", repr(shape)[:80],
                          "a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[1] < offsets[0]):
        raise _bad_header(path, f"tensor '{name}' has malformed data_offsets", repr(offsets)[:80],
                          "[start, end] with 0 <= start <= end")
    need = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != need:
        raise _bad_header(path, f"tensor '{name}': its shape does not match its byte span",
                          f"{dtype} {shape} = {need} bytes, data_offsets {offsets} = {offsets[1] - offsets[0]} bytes",
                          "end - start == product(shape) * dtype size")
    return offsets[0], offsets[1]


@dataclass(frozen=True)
class LazyWeight:
    """One parameter, read from its safetensors file only when ``read()`` is called."""
    shape: torch.Size
    path: Path
    hf_name: str
    index: tuple = ()  # a slice of the stored tensor (transformers-5 stacked experts)
    dtype: torch.dtype | None = None  # converted to on read
    packed: mxfp4.Pair | None = None  # hf_name is MXFP4 blocks: dequantized (with these scales) on read

    def read(self) -> torch.Tensor:
        """The weight (in ``dtype``), checked for NaN / Inf. Read and converted READ_CHUNK values
        at a time into the result: memory holds the result and a chunk, not the stored tensor as
        well (a 32000 x 4096 bf16 embedding read as fp16 would take 250 MB more)."""
        from safetensors import safe_open

        if self.packed is not None:
            tensor = self.packed.read(self.index)
            _require_finite(tensor, self.hf_name, self.path, tensor.numel())
            return tensor if self.dtype is None else tensor.to(self.dtype)
        if self.index and self.index[-1] == TRANSPOSE:  # one expert's [in, out] slab, read whole, transposed
            with safe_open(str(self.path), framework="pt") as fh:
                tensor = fh.get_slice(self.hf_name)[self.index[:-1]].T.contiguous()
            _require_finite(tensor, self.hf_name, self.path, tensor.numel())
            return tensor if self.dtype is None else tensor.to(self.dtype)
        with safe_open(str(self.path), framework="pt") as fh:
            stored = fh.get_slice(self.hf_name)
            if self.dtype is None or not self.shape or self.shape[0] == 0:
                tensor = stored[self.index] if self.index else fh.get_tensor(self.hf_name)
                _require_finite(tensor, self.hf_name, self.path, tensor.numel())
                return tensor if self.dtype is None else tensor.to(self.dtype)
            out = torch.empty(self.shape, dtype=self.dtype)
            rows = max(1, READ_CHUNK // max(1, math.prod(self.shape[1:])))
            bad = 0
            for start in range(0, self.shape[0], rows):
                chunk = stored[_rows(self.index, start, min(start + rows, self.shape[0]))]
                bad += _nonfinite(chunk)
                out[start:start + rows] = chunk  # converted as copied
        _require_finite(out, self.hf_name, self.path, out.numel(), bad)
        return out


def _rows(index: tuple, start: int, stop: int) -> tuple:
    """The stored tensor's index of rows ``start:stop`` of the weight ``index`` selects (leading
    ints pick a sub-tensor; a slice after them bounds the weight's first dimension)."""
    picks = tuple(i for i in index if isinstance(i, int))
    rest = index[len(picks):]
    if not rest:
        return (*picks, slice(start, stop))
    first = rest[0]
    assert isinstance(first, slice) and (first.step or 1) > 0, index  # the adapters' forms
    base, step = first.start or 0, first.step or 1  # a step: every step-th row (GPT-OSS's interleaved gate|up)
    return (*picks, slice(base + start * step, base + stop * step, step), *rest[1:])


def _require_finite(tensor: torch.Tensor, name: str, path: Path, numel: int, bad: int | None = None) -> None:
    """CheckpointError naming the weight when it holds NaN or Inf (``bad`` values, counted here
    when not given)."""
    bad = _nonfinite(tensor) if bad is None else bad
    if bad:
        raise CheckpointError(f"weight '{name}' holds NaN or Inf values",
                              given=f"{path.name}: {bad} of {numel} values not finite",
                              expected="finite weights", hint="the checkpoint is damaged; download it again")


def _nonfinite(tensor: torch.Tensor) -> int:
    """How many values are NaN or Inf. Cheap: one sum (NaN and Inf propagate; float32
    accumulation cannot overflow on real weights), an exact count only when the sum is not
    finite (isfinite().all() costs ~20x more: a bool tensor per weight). The sum runs over
    READ_CHUNK values at a time: torch widens its whole input first."""
    if not tensor.is_floating_point():
        return 0
    wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if math.isfinite(sum(_wide_sum(part, wide) for part in tensor.reshape(-1).split(READ_CHUNK))):
        return 0
    return sum(int((~torch.isfinite(part.to(wide))).sum()) for part in tensor.reshape(-1).split(READ_CHUNK))


def _wide_sum(part: torch.Tensor, wide: torch.dtype) -> float:
    try:
        return float(part.sum(dtype=wide))
    except (RuntimeError, TypeError):  # a dtype without a sum kernel (float8): widen first
        return float(part.to(wide).sum())


def iter_weights(model_dir: Path, adapter: Adapter) -> Iterator[tuple[str, LazyWeight]]:
    """(mixport name, lazy weight) for every tensor of the folder, after validating each file;
    nothing but the headers is read. Names follow ``adapter``'s rules (stacked experts split)."""
    from safetensors import safe_open

    files = safetensors_files(model_dir)
    shapes: dict[str, tuple[Path, tuple[int, ...]]] = {}  # every tensor's file and shape (headers only)
    for path in files:
        check_safetensors(path)
        with safe_open(str(path), framework="pt") as fh:
            shapes.update((name, (path, tuple(fh.get_slice(name).get_shape()))) for name in fh.keys())
    pairs = mxfp4.pairs(shapes)  # MXFP4 blocks -> their scales; the scales are read with them
    scales = mxfp4.scales_of(pairs)
    for hf_name, (path, shape) in shapes.items():
        pair = pairs.get(hf_name)
        if hf_name in scales:
            continue
        stored = hf_name if pair is None else pair.name
        for name, part, index in adapter.checkpoint_names(stored, shape if pair is None else pair.shape):
            yield name, LazyWeight(torch.Size(part), path, hf_name, index, packed=pair)


def load_state_dict(model_dir: Path, cfg: MoEConfig, expected: dict[str, torch.Size],
                    dtype: torch.dtype, lazy: bool = False) -> dict[str, torch.Tensor] | dict[str, LazyWeight]:
    """Every parameter the reference model expects, checked for presence and shape (from the
    headers); ``lazy``: LazyWeights that read (and convert) one tensor when asked."""
    adapter = registry.for_config(cfg)
    state: dict[str, LazyWeight] = {}
    unused: list[str] = []
    for name, weight in iter_weights(model_dir, adapter):
        if name in expected:
            state[name] = dataclasses.replace(weight, dtype=dtype)
        elif not adapter.ignorable(name, tuple(weight.shape), cfg):
            unused.append(weight.hf_name)
    if unused:  # a weight the config does not build would be dropped silently: the model would compute wrong
        raise CheckpointError(f"{len(unused)} checkpoint weights are not used by this config.json",
                              given=", ".join(sorted(set(unused))[:3]) + ("..." if len(set(unused)) > 3 else ""),
                              expected=f"only the {adapter.name} parameters this config.json describes",
                              hint="does config.json match the weights (biases, norms, shared experts, layers)?")
    if "lm_head.weight" not in state and cfg.tie_word_embeddings and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{len(missing)} weights missing from the checkpoint",
                              given=", ".join(missing[:3]) + ("..." if len(missing) > 3 else ""),
                              expected=f"every {adapter.name} parameter for this config.json")
    for name, w in state.items():
        if w.shape != expected[name]:
            raise CheckpointError(f"weight '{name}' has the wrong shape", given=tuple(w.shape),
                                  expected=tuple(expected[name]), hint="does config.json match the weights?")
    if lazy:
        return state
    tensors, read = {}, {}  # one read per LazyWeight: tied names share the tensor
    for name, w in state.items():
        if id(w) not in read:
            read[id(w)] = w.read()
        tensors[name] = read[id(w)]
    return tensors
