"""Shared exports for the pass tests: each torch export costs ~10 s, so they are session-scoped."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from mixport import artifact, ops
from mixport.exporter.export import export
from mixport.exporter.tiny import TINY, write_tiny
from mixport.passes import run_pipeline


def export_config(root: Path, name: str, dtype: str = "fp32", **changes: int) -> Path:
    """An unfused export folder of the tiny Mixtral with ``changes`` to its config."""
    cfg = dataclasses.replace(TINY, **changes)
    src = write_tiny(root / f"{name}-hf", cfg, seed=0)
    return export(src, root / name, dtype=dtype, fuse=False).out_dir


def fused_folder(unfused: Path, dst: Path, target: str = "portable") -> Path:
    """A copy of an unfused export folder whose model.onnx went through the pipeline."""
    shutil.copytree(unfused, dst)
    proto, counts = run_pipeline(onnx.load(str(unfused / artifact.MODEL_FILE)), target=target)
    onnx.save_model(proto, str(dst / artifact.MODEL_FILE))
    manifest = json.loads((dst / artifact.MANIFEST).read_text())
    manifest.update(onnx_sha256=artifact.file_sha256(dst / artifact.MODEL_FILE), fused=True, passes=counts,
                    target=target)
    (dst / artifact.MANIFEST).write_text(json.dumps(manifest))
    return dst


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter((n.domain or "", n.op_type) for n in model.graph.node)


def ort_run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feed)


def model_feed(cfg_layers: int, seq: int, batch: int = 2, seed: int = 0, dtype: type = np.float32,
               kv: tuple[int, int] = (TINY.num_key_value_heads, TINY.head_dim)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {"input_ids": rng.integers(3, 500, (batch, seq)), "attention_mask": np.ones((batch, seq), np.int64),
            "position_ids": np.tile(np.arange(seq), (batch, 1))}
    for i in range(cfg_layers):
        for part in ("key", "value"):
            feed[f"past_key_values.{i}.{part}"] = np.zeros((batch, kv[0], 0, kv[1]), dtype)
    return feed


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """exports(name) -> an unfused export folder, made once per session per name."""
    root = tmp_path_factory.mktemp("exports")
    configs = {"tiny": ("fp32", {}), "e4k1": ("fp32", dict(num_local_experts=4, num_experts_per_tok=1)),
               "fp16": ("fp16", {}), "bf16": ("bf16", dict(num_local_experts=4, num_experts_per_tok=1))}
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            dtype, changes = configs[name]
            made[name] = export_config(root, name, dtype, **changes)
        return made[name]

    return get


@pytest.fixture(scope="session")
def tiny_unfused(exports: Callable[[str], Path]) -> onnx.ModelProto:
    return onnx.load(str(exports("tiny") / artifact.MODEL_FILE))


def moe_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == ops.DOMAIN and n.op_type == ops.MOE]


def routers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == ops.DOMAIN and n.op_type == ops.TOPK_ROUTING]
