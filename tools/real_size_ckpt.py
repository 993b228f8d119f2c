"""A Mixtral-8x7B-shaped checkpoint for tools/bench_real_size.py, written shard by shard.

The hub's layout at Mixtral-8x7B's exact dimensions (hidden 4096, intermediate 14336, 32 / 8 heads,
head_dim 128, 8 experts top-2, vocab 32000), N layers instead of 32: bf16 safetensors, one shard per
decoder layer plus one for the embedding, final norm and lm_head, ``model.safetensors.index.json``,
config.json and a small trained tokenizer (ids < 512; the vocab stays 32000).

Weights are seeded and drawn tensor by tensor, a chunk at a time, straight into the shard file (its
safetensors header is known beforehand from the shapes), so writing needs a few tens of MB whatever
the size. Each value is ``mean + std * z``, z one of 65536 equally likely normal quantiles (the
inverse normal CDF at (i + 0.5) / 65536), rounded to bf16 once per table: i.i.d. N(mean, std^2)
within bf16's own resolution, about twice as fast as drawing normals. The law follows
``mixport.exporter.tiny``'s: norms 1 + 0.1 z, routers and the embedding z, the rest z / sqrt(fan_in).
The folder is written as ``.NAME.tmp`` and renamed when complete, with a marker (``MARKER``: layers,
seed, dimensions) that lets a later run reuse it.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import real_size_families as families

MARKER = "real_size_ckpt.json"
VERSION = 1
DIMS: dict[str, Any] = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                        "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768,
                        "rope_theta": 1e6}
TINY_DIMS: dict[str, Any] = {**DIMS, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 32,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                             "num_local_experts": 4, "max_position_embeddings": 512}  # --tiny: seconds
CHUNK = 1 << 24  # values drawn at a time (32 MB of indices + 32 MB of bf16)


def config(layers: int, tiny: bool = False):  # -> MoEConfig
    from mixport.exporter.tiny import MINI_MIXTRAL

    return replace(MINI_MIXTRAL, num_hidden_layers=layers, **(TINY_DIMS if tiny else DIMS))


def folder_name(layers: int, seed: int, tiny: bool = False, family: str = "mixtral") -> str:
    fam = "" if family == "mixtral" else f"-{family}"
    return f"ckpt{fam}{'-tiny' if tiny else ''}-L{layers}-s{seed}"


def marker(layers: int, seed: int, tiny: bool = False, family: str = "mixtral") -> dict[str, Any]:
    if family != "mixtral":  # tools/real_size_families.py: its config.json is the marker's dimensions
        return {"version": VERSION, "family": family, "layers": layers, "seed": seed,
                "config": families.hf_config(family, layers, tiny)}
    return {"version": VERSION, "layers": layers, "seed": seed, "dims": TINY_DIMS if tiny else DIMS}


def is_complete(folder: Path, layers: int, seed: int, tiny: bool = False, family: str = "mixtral") -> bool:
    """FOLDER holds this module's checkpoint for these layers / seed / dimensions."""
    try:
        return json.loads((folder / MARKER).read_text()) == marker(layers, seed, tiny, family)
    except (OSError, ValueError):
        return False


def bf16_table(mean: float, std: float) -> Any:
    """65536 bf16 bit patterns: mean + std * the normal quantiles at (i + 0.5) / 65536 (rounded to nearest)."""
    from statistics import NormalDist

    import numpy as np

    z = NormalDist()
    f32 = np.array([mean + std * z.inv_cdf((i + 0.5) / 65536) for i in range(65536)], dtype=np.float32)
    bits = f32.view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def law(name: str, shape: tuple[int, ...], routers: set[str]) -> tuple[float, float]:
    """(mean, std) of weight ``name`` (mixport's name), as mixport.exporter.tiny draws it."""
    if len(shape) == 1:
        return (1.0, 0.1) if "norm" in name else (0.0, 0.1)
    return 0.0, (1.0 if name in routers or "embed" in name else shape[-1] ** -0.5)


def plan(cfg: Any) -> tuple[list[list[tuple[str, str, tuple[int, ...]]]], set[str]]:
    """(shards: [[(mixport name, hub name, shape)]], one per layer then the rest; router names)."""
    import re

    from mixport.exporter.loader import expected_shapes
    from mixport.models import registry

    adapter = registry.for_config(cfg)
    routers = {adapter.router_weight(i) for i in adapter.moe_layers(cfg)}
    groups: dict[int, list[tuple[str, str, tuple[int, ...]]]] = {}
    for name, shape in sorted(expected_shapes(cfg).items()):
        m = re.search(r"layers\.(\d+)\.", name)
        groups.setdefault(int(m.group(1)) if m else cfg.num_hidden_layers, []).append(
            (name, adapter.hub_name(name), tuple(shape)))
    return [groups[k] for k in sorted(groups)], routers


def write_shard(path: Path, tensors: list[tuple[Any, ...]], routers: set[str], seed: int,
                tables: dict[tuple[float, float], Any]) -> int:
    """One safetensors file, each tensor drawn a chunk at a time into it; its tensors' bytes. A tensor is
    (name, hub name, shape[, dtype]): BF16 (the default) or U8, MXFP4 blocks (random FP4 codes) or
    scales (one exponent: ``families.scale_exponent``)."""
    import numpy as np

    header: dict[str, Any] = {}
    offset = 0
    for _, hub, shape, *dtype in tensors:
        size = math.prod(shape) * (1 if dtype == ["U8"] else 2)
        header[hub] = {"dtype": dtype[0] if dtype else "BF16", "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, _, shape, *dtype in tensors:
            if dtype == ["U8"]:
                write_u8(f, name, shape, seed)
                continue
            key = law(name, shape, routers)
            table = tables.get(key)
            if table is None:
                table = tables[key] = bf16_table(*key)
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            left = math.prod(shape)
            while left:
                n = min(left, CHUNK)
                f.write(np.take(table, rng.integers(0, 65536, n, dtype=np.uint16)).data)
                left -= n
    return offset


def write_u8(f: Any, name: str, shape: tuple[int, ...], seed: int) -> None:
    """MXFP4 scales (one exponent) or blocks (uniform random bytes: two FP4 codes each), a chunk at a time."""
    import numpy as np

    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    left = math.prod(shape)
    while left:
        n = min(left, CHUNK)
        if name.endswith("_scales"):
            f.write(np.full(n, families.scale_exponent(shape), dtype=np.uint8).data)
        else:
            f.write(rng.integers(0, 256, n, dtype=np.uint8).data)
        left -= n


def write_side_files(out: Path, cfg: Any, hf: dict[str, Any] | None = None) -> None:
    """config.json (bf16, as the hub's; HF: that one), tokenizer.json / tokenizer_config.json,
    generation_config.json."""
    from mixport.exporter import tiny
    from mixport.models import registry

    if hf is None:
        hf = {**registry.for_config(cfg).to_hf_dict(cfg), "torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    tiny.build_tokenizer(512).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "add_bos_token": True}, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id} if cfg is not None else
        {"bos_token_id": hf.get("bos_token_id"), "eos_token_id": hf.get("eos_token_id")}))


def write(folder: Path, layers: int, seed: int, tiny: bool = False, progress: Any = print,
          family: str = "mixtral") -> dict[str, Any]:
    """Write the checkpoint into FOLDER (through ``.FOLDER.tmp``, renamed at the end); {shards, bytes}.
    FAMILY gpt_oss / deepseek_v2: tools/real_size_families.py's layers instead of Mixtral's."""
    hf = None if family == "mixtral" else families.hf_config(family, layers, tiny)
    cfg = config(layers, tiny) if hf is None else None
    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a killed run's leftovers (this module's name)
    tmp.mkdir(parents=True)
    shards, routers = plan(cfg) if hf is None else families.plan(hf)
    index: dict[str, str] = {}
    tables: dict[tuple[float, float], Any] = {}
    total = 0
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_shard(tmp / fname, tensors, routers, seed, tables)
        index.update({t[1]: fname for t in tensors})
        progress(f"wrote {fname}")
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    write_side_files(tmp, cfg, hf)
    (tmp / MARKER).write_text(json.dumps(marker(layers, seed, tiny, family)))
    tmp.rename(folder)
    return {"shards": len(shards), "bytes": total}
