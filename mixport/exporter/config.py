"""Read a Hugging Face config.json into mixport's config, through the family's adapter."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mixport.errors import ConfigError
from mixport.models import MoEConfig, registry


def load_config(model_dir: Path) -> tuple[MoEConfig, str]:
    """Read MODEL_DIR/config.json; return the config and a sha256 of the file."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError("no config.json in the model folder", given=str(model_dir),
                          expected="a Hugging Face folder with config.json and *.safetensors")
    data = path.read_bytes()
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, an int of 4300+ digits, deep nesting
        raise ConfigError("config.json is not valid JSON", given=f"{path}: {str(exc)[:200]}",
                          expected="a JSON object") from None
    if not isinstance(raw, dict):
        raise ConfigError("config.json is not a JSON object", given=type(raw).__name__, expected="an object")
    return registry.find(raw).config_from_hf(raw), hashlib.sha256(data).hexdigest()
