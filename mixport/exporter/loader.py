"""Build mixport's reference model from a Hugging Face folder (the family adapter composes it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mixport.errors import ConfigError
from mixport.exporter.checkpoint import LazyWeight, load_state_dict
from mixport.exporter.config import load_config
from mixport.models import MoEConfig, registry
from mixport.models.components import DecoderModel, rope_buffers

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError("unsupported dtype", given=name, expected=" | ".join(DTYPES))
    return DTYPES[name]


def reference_model(cfg: MoEConfig) -> DecoderModel:
    """The family's reference model for ``cfg`` (on the current default device, e.g. meta)."""
    return registry.for_config(cfg).reference_model(cfg)


def build_model(cfg: MoEConfig, state: dict[str, torch.Tensor]) -> DecoderModel:
    """A reference model whose parameters are exactly ``state`` (no copy, no init)."""
    with torch.device("meta"):
        model = reference_model(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    for name, value in rope_buffers(cfg).items():  # not in the checkpoint: computed off the meta device
        setattr(model, name, value)
    return model.eval()


def expected_shapes(cfg: MoEConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in reference_model(cfg).state_dict().items()}


def _load(model_dir: Path, dtype: str, lazy: bool = False) -> tuple[MoEConfig, str, dict[str, Any]]:
    """(config, config sha256, every parameter in ``dtype``: tensors, or LazyWeights) for MODEL_DIR."""
    cfg, config_hash = load_config(model_dir)
    return cfg, config_hash, load_state_dict(model_dir, cfg, expected_shapes(cfg), torch_dtype(dtype), lazy)


def load_reference(model_dir: Path, dtype: str = "fp32") -> tuple[DecoderModel, MoEConfig, str]:
    """(model, config, config sha256) for MODEL_DIR, weights in ``dtype``."""
    cfg, config_hash, state = _load(model_dir, dtype)
    return build_model(cfg, state), cfg, config_hash


def load_for_export(model_dir: Path, dtype: str = "fp32"
                    ) -> tuple[DecoderModel, dict[str, LazyWeight], MoEConfig, str]:
    """A weightless (meta-device) model to trace, plus its weights by name, each read from the
    checkpoint only when the exporter writes it: export never holds the weights in memory."""
    cfg, config_hash, state = _load(model_dir, dtype, lazy=True)
    with torch.device("meta"):
        model = reference_model(cfg).to(torch_dtype(dtype))
        for name, value in rope_buffers(cfg).items():  # fp32 even when the weights are not
            setattr(model, name, value)
    return model.eval(), state, cfg, config_hash
