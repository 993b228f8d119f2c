"""Read a Hugging Face folder's safetensors (never pickles) into mixport names (the family
adapter's checkpoint rules)."""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mixport.errors import CheckpointError
from mixport.models import Adapter, MoEConfig, registry

INDEX = "model.safetensors.index.json"


def safetensors_files(model_dir: Path) -> list[Path]:
    """The folder's weight files: sharded via the index, else every *.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError("unreadable safetensors index", given=f"{index}: {exc!r}",
                                  expected="a JSON object with a 'weight_map'") from None
        files = sorted({model_dir / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError("the safetensors index names shards that are missing",
                                  given=", ".join(missing), expected="every shard beside the index")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    if list(model_dir.glob("pytorch_model*.bin")) or list(model_dir.glob("*.pt")):
        raise CheckpointError("the folder holds only pickled weights (pytorch_model*.bin), which mixport "
                              "never loads", given=str(model_dir), expected="*.safetensors",
                              hint="convert once in a trusted environment: "
                                   "AutoModelForCausalLM.from_pretrained(d).save_pretrained(d, "
                                   "safe_serialization=True)")
    raise CheckpointError("no weights in the model folder", given=str(model_dir),
                          expected="model.safetensors or sharded model-*.safetensors + " + INDEX)


def check_safetensors(path: Path) -> None:
    """Validate the header and that every tensor's bytes lie inside the file (truncation)."""
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
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError("safetensors header is not valid JSON", given=str(path),
                                  expected="a safetensors file") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if ends and max(ends) > size - 8 - n:
        raise CheckpointError("safetensors file is truncated", given=f"{path}: {size} bytes",
                              expected=f"{max(ends) + 8 + n} bytes as its header declares",
                              hint="download or copy it again")


@dataclass(frozen=True)
class LazyWeight:
    """One parameter, read from its safetensors file only when ``read()`` is called."""
    shape: torch.Size
    path: Path
    hf_name: str
    index: tuple = ()  # a slice of the stored tensor (transformers-5 stacked experts)
    dtype: torch.dtype | None = None  # converted to on read

    def read(self) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as fh:
            tensor = fh.get_slice(self.hf_name)[self.index] if self.index else fh.get_tensor(self.hf_name)
        return tensor if self.dtype is None else tensor.to(self.dtype)


def iter_weights(model_dir: Path, adapter: Adapter) -> Iterator[tuple[str, LazyWeight]]:
    """(mixport name, lazy weight) for every tensor of the folder, after validating each file;
    nothing but the headers is read. Names follow ``adapter``'s rules (stacked experts split)."""
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        check_safetensors(path)
        with safe_open(str(path), framework="pt") as fh:
            for hf_name in fh.keys():
                shape = tuple(fh.get_slice(hf_name).get_shape())
                for name, part, index in adapter.checkpoint_names(hf_name, shape):
                    yield name, LazyWeight(torch.Size(part), path, hf_name, index)


def load_state_dict(model_dir: Path, cfg: MoEConfig, expected: dict[str, torch.Size],
                    dtype: torch.dtype, lazy: bool = False) -> dict[str, torch.Tensor] | dict[str, LazyWeight]:
    """Every parameter the reference model expects, checked for presence and shape (from the
    headers); ``lazy``: LazyWeights that read (and convert) one tensor when asked."""
    adapter = registry.for_config(cfg)
    state: dict[str, LazyWeight] = {}
    for name, weight in iter_weights(model_dir, adapter):
        if name in expected:
            state[name] = dataclasses.replace(weight, dtype=dtype)
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
