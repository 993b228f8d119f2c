"""model_type / architectures -> the family's adapter. A new family adds its line to ADAPTERS."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mixport.errors import ConfigError
from mixport.models.adapter import Adapter
from mixport.models.config import DEFAULT_MODEL_TYPE
from mixport.models.deepseek_v2 import DeepseekV2
from mixport.models.deepseek_v3 import DeepseekV3
from mixport.models.gpt_oss import GptOss
from mixport.models.granitemoe import GraniteMoe, GraniteMoeShared
from mixport.models.mixtral import Mixtral
from mixport.models.olmoe import Olmoe
from mixport.models.phimoe import Phimoe
from mixport.models.qwen2_moe import Qwen2Moe
from mixport.models.qwen3_moe import Qwen3Moe
from mixport.typed_json import shown

ADAPTERS: tuple[Adapter, ...] = (
    Mixtral(),
    Qwen2Moe(),
    Qwen3Moe(),
    Olmoe(),
    GraniteMoe(),
    GraniteMoeShared(),
    Phimoe(),
    GptOss(),
    DeepseekV2(),
    DeepseekV3(),
)


def supported() -> str:
    """'MixtralForCausalLM (mixtral), ...': what mixport exports, for messages."""
    return ", ".join(f"{'/'.join(a.architectures)} ({a.model_type})" for a in ADAPTERS)


def lookup(model_type: str | None) -> Adapter | None:
    """The adapter for ``model_type`` (None: a config written before the adapters, i.e. Mixtral)."""
    model_type = model_type or DEFAULT_MODEL_TYPE
    return next((a for a in ADAPTERS if a.model_type == model_type), None)


def get(model_type: str | None) -> Adapter:
    """As ``lookup``; ConfigError (one line naming the supported families) when unknown."""
    adapter = lookup(model_type)
    if adapter is None:
        raise ConfigError("unsupported model_type", given=model_type, expected=f"one of {supported()}")
    return adapter


def for_config(cfg: Any) -> Adapter:
    """The adapter of a MoEConfig, or of a manifest's config dict."""
    model_type = cfg.get("model_type") if isinstance(cfg, Mapping) else cfg.model_type
    return get(model_type)


def find(raw: Mapping[str, Any]) -> Adapter:
    """The adapter for a parsed config.json: by ``architectures``, else by ``model_type``."""
    archs = raw.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError("config.json field 'architectures' must be a list of class names", given=shown(archs),
                          expected=f'e.g. ["{ADAPTERS[0].name}"]')
    if not isinstance(raw.get("model_type"), (str, type(None))):
        raise ConfigError("config.json field 'model_type' must be a string", given=shown(raw["model_type"]),
                          expected=f'e.g. "{ADAPTERS[0].model_type}"')
    for adapter in ADAPTERS:
        if any(a in adapter.architectures for a in archs):
            return adapter
    adapter = lookup(raw.get("model_type")) if raw.get("model_type") else None
    if adapter is None:
        raise ConfigError("unsupported architecture", given=archs or raw.get("model_type"),
                          expected=f"one of {supported()}",
                          hint="mixport exports the MoE decoders its registry lists")
    return adapter
