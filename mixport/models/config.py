"""The model configuration mixport works with: one dataclass for every family (no torch).

A family's adapter maps its config.json onto these fields (``Adapter.config_from_hf``);
the export's manifest records them as ``config`` (``dataclasses.asdict``). A field a new
family needs is added here with a neutral default (the value under which every existing
family behaves as before), so that older manifests and adapters stay valid, and its type and
range are declared in ``mixport.config_fields.FIELDS`` (checked for config.json and manifests).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

DEFAULT_MODEL_TYPE = "mixtral"  # what a manifest without ``model_type`` (written before the adapters) holds


@dataclass(frozen=True)
class MoEConfig:
    """A sparse-MoE decoder: the fields the reference model, exporter and runtimes need."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # of one routed expert
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    normalization: str = "renormalize"  # "renormalize" (Mixtral) | "none"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    model_type: str = DEFAULT_MODEL_TYPE  # the family: its adapter's key in mixport.models.registry

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


def defaults() -> dict[str, Any]:
    """Each field that has a default, with it (the neutral value a newer field takes in older files)."""
    return {f.name: f.default for f in fields(MoEConfig) if f.default is not MISSING}


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(MoEConfig))
