"""The model configuration mixport understands, read from a Hugging Face config.json."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from mixport.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM",)
REQUIRED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_local_experts", "num_experts_per_tok",
)


@dataclass(frozen=True)
class MoEConfig:
    """A Mixtral-family decoder: the fields the reference model and exporter need."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
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

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers' MixtralConfig loads."""
        d = {k: v for k, v in asdict(self).items() if k not in ("normalization", "rope_theta")}
        d.update(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_act="silu",
                 rope_theta=self.rope_theta,
                 rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                 torch_dtype="float32")
        return d


def _rope_theta(raw: dict[str, Any]) -> float:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ConfigError("unsupported rotary embedding scaling", given=rope_type,
                          expected="default (no rope scaling)",
                          hint="mixport implements plain RoPE with the config's rope_theta")
    return float(params.get("rope_theta", raw.get("rope_theta", 1e6)))


def _check_positive(raw: dict[str, Any]) -> None:
    for name in REQUIRED_FIELDS:
        if name not in raw:
            raise ConfigError(f"config.json lacks the field '{name}'",
                              given=f"fields {sorted(raw)[:8]}...", expected=", ".join(REQUIRED_FIELDS),
                              hint="is this a Mixtral config.json?")
        if not isinstance(raw[name], int) or raw[name] <= 0:
            raise ConfigError(f"config.json field '{name}' must be a positive integer",
                              given=raw[name], expected="an integer > 0")


def config_from_dict(raw: dict[str, Any]) -> MoEConfig:
    """Validate a parsed config.json and build the config; raise ConfigError on anything off."""
    archs = raw.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and raw.get("model_type") != "mixtral":
        raise ConfigError("unsupported architecture", given=archs or raw.get("model_type"),
                          expected=" or ".join(SUPPORTED_ARCHITECTURES),
                          hint="mixport exports Mixtral-family MoE decoders")
    _check_positive(raw)
    heads = raw["num_attention_heads"]
    kv_heads = raw.get("num_key_value_heads") or heads
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    if heads % kv_heads:
        raise ConfigError("num_attention_heads is not a multiple of num_key_value_heads",
                          given=f"{heads} / {kv_heads}", expected="an integer ratio")
    if raw["num_experts_per_tok"] > raw["num_local_experts"]:
        raise ConfigError("num_experts_per_tok exceeds num_local_experts",
                          given=f"{raw['num_experts_per_tok']} > {raw['num_local_experts']}",
                          expected="top-k <= number of experts")
    known = {f.name for f in fields(MoEConfig)}
    kwargs = {k: raw[k] for k in known if k in raw and raw[k] is not None}
    kwargs.update(num_key_value_heads=kv_heads, head_dim=head_dim, rope_theta=_rope_theta(raw))
    return MoEConfig(**kwargs)


def load_config(model_dir: Path) -> tuple[MoEConfig, str]:
    """Read MODEL_DIR/config.json; return the config and a sha256 of the file."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError("no config.json in the model folder", given=str(model_dir),
                          expected="a Hugging Face folder with config.json and *.safetensors")
    data = path.read_bytes()
    try:
        raw = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ConfigError("config.json is not valid JSON", given=f"{path}: {exc}",
                          expected="a JSON object") from None
    if not isinstance(raw, dict):
        raise ConfigError("config.json is not a JSON object", given=type(raw).__name__, expected="an object")
    return config_from_dict(raw), hashlib.sha256(data).hexdigest()
