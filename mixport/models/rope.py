"""Rotary position embeddings with the scalings hub configs use: plain, YaRN and LongRoPE, computed as
transformers 5 computes them (``modeling_rope_utils``), in numpy (no torch: the runtimes use it too).

A config.json names the scaling in ``rope_parameters`` (transformers 5) or ``rope_scaling`` (older files),
with ``rope_type`` (or ``type``); ``from_hf`` reads it into MoEConfig's ``rope_*`` fields, which the
manifest records. What the model then computes, per forward call with position ids ``pos``:

* ``default``: inv_freq = 1 / theta ** (2i / dim); cos/sin = cos/sin(pos * inv_freq).
* ``yarn``: inv_freq blends interpolated (1 / (factor * theta ** (2i / dim))) and extrapolated frequencies
  with a linear ramp between the correction dims of ``beta_fast`` / ``beta_slow`` rotations over
  ``original_max_position_embeddings`` (floored / ceiled unless ``truncate`` is false); cos and sin are
  multiplied by the attention factor (given, else from ``mscale`` / ``mscale_all_dim``, else
  0.1 ln(factor) + 1). DeepSeek's attention also multiplies its softmax scale by ``mscale_scale``.
* ``longrope``: inv_freq = 1 / (ext * theta ** (2i / dim)) with ext = ``short_factor``, or ``long_factor``
  when max(pos) + 1 > ``original_max_position_embeddings`` (one choice per call, as transformers'
  ``dynamic_rope_update``); cos and sin times the attention factor (given, else
  sqrt(1 + ln(factor) / ln(original))). Phi-3.5-MoE's own rotary class differs (its family says how).

``dim`` is the rotated width: head_dim, or a family's rope part (DeepSeek's ``qk_rope_head_dim``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from mixport.config_fields import FIELDS
from mixport.errors import ConfigError
from mixport.typed_json import shown

if TYPE_CHECKING:
    from mixport.models.config import MoEConfig

TYPES = ("default", "yarn", "longrope")
# config.json key inside the rope section -> (MoEConfig field, its declaration)
_KEYS: dict[str, str] = {
    "factor": "rope_factor", "original_max_position_embeddings": "rope_original_max",
    "attention_factor": "rope_attention_factor", "beta_fast": "rope_beta_fast", "beta_slow": "rope_beta_slow",
    "mscale": "rope_mscale", "mscale_all_dim": "rope_mscale_all_dim", "truncate": "rope_truncate",
    "short_factor": "rope_short_factor", "long_factor": "rope_long_factor",
    "short_mscale": "rope_short_mscale", "long_mscale": "rope_long_mscale",
}
_BY_TYPE = {  # the keys each type reads (any other key of the section is ignored, as transformers does)
    "default": (),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"),
    "longrope": ("factor", "original_max_position_embeddings", "attention_factor", "short_factor", "long_factor",
                 "short_mscale", "long_mscale"),
}
FIELD_NAMES = ("rope_type", *_KEYS.values())  # MoEConfig's scaling fields (rope_theta apart)
_FALSY_IS_UNSET = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim")  # transformers reads them with `or`


def section(raw: Mapping[str, Any], family_default: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(config.json key, the rope section as transformers 5 reads it): ``rope_scaling`` when it is given
    (transformers lets it replace ``rope_parameters``), else ``rope_parameters``, else the family's
    default (e.g. GPT-OSS's yarn) or {}. Both are checked to be objects."""
    found = []
    for key in ("rope_scaling", "rope_parameters"):
        value = raw.get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"config.json field '{key}' must be an object", given=shown(value),
                              expected='an object such as {"rope_type": "yarn", "factor": 32.0}, or null')
        if value:
            found.append((key, dict(value)))
    if found:
        return found[0]
    return "rope_parameters", dict(family_default or {})


def from_hf(raw: Mapping[str, Any], default_theta: float, *, types: tuple[str, ...] = TYPES,
            family_default: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """config.json -> MoEConfig's rope fields (``rope_theta`` and the ``rope_*`` scaling fields);
    ConfigError (one line naming the key) for a type outside ``types`` or a malformed value."""
    key, params = section(raw, family_default)
    for other in ("rope_scaling", "rope_parameters"):  # a scaling named in either section must be one we compute
        section_ = params if other == key else (raw.get(other) or {})
        for name in ("rope_type", "type"):
            value = section_.get(name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"config.json field '{other}.{name}' must be a string", given=shown(value),
                                  expected='a rope type such as "default"')
            if value is not None and value not in types:
                raise ConfigError(f"unsupported rotary embedding scaling in config.json field '{other}.{name}'",
                                  given=value, expected=" | ".join(types),
                                  hint="mixport implements these rope types exactly as transformers computes them")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) not in (1, 1.0, None):
        raise ConfigError("config.json field 'partial_rotary_factor' is not implemented",
                          given=shown(params.get("partial_rotary_factor", raw.get("partial_rotary_factor"))),
                          expected="1.0 (RoPE over the whole rotated width)")
    out: dict[str, Any] = {"rope_theta": _theta(raw, key, params, default_theta), "rope_type": rope_type}
    for name in _BY_TYPE[rope_type]:
        value = params.get(name)
        if name == "original_max_position_embeddings" and raw.get(name) is not None:
            value = raw[name]  # Phi-3 style: the top-level key wins (transformers' standardize_rope_params)
            where = name
        else:
            where = f"{key}.{name}"
        if name in _FALSY_IS_UNSET and value == 0:
            value = None
        field = _KEYS[name]
        if value is not None and not FIELDS[field].accepts(value):
            raise ConfigError(f"config.json field '{where}' must be {FIELDS[field].expected()}", given=shown(value))
        out[field] = tuple(float(v) for v in value) if isinstance(value, list) else value
    if rope_type != "default":
        _complete(raw, key, out)
    return out


def to_hf(cfg: MoEConfig) -> dict[str, Any]:
    """The ``rope_parameters`` section of a config.json for ``cfg`` (tiny test folders)."""
    out: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    for key in _BY_TYPE[cfg.rope_type]:
        value = getattr(cfg, _KEYS[key])
        if value is not None:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _theta(raw: Mapping[str, Any], key: str, params: Mapping[str, Any], default: float) -> float:
    given = [(k, v) for k, v in ((f"{key}.rope_theta", params.get("rope_theta")),
                                 ("rope_theta", raw.get("rope_theta"))) if v is not None]
    for name, theta in given:  # both checked, though the section wins (as in transformers 5)
        if not FIELDS["rope_theta"].accepts(theta):
            raise ConfigError(f"config.json field '{name}' must be {FIELDS['rope_theta'].expected()}",
                              given=shown(theta))
    return float(given[0][1]) if given else float(default)


def _complete(raw: Mapping[str, Any], key: str, out: dict[str, Any]) -> None:
    """The values transformers fills in: original_max_position_embeddings (else max_position_embeddings),
    factor (else max / original); longrope's factor lists must be there, dim/2 long each (checked later)."""
    if out.get("rope_original_max") is None:
        out["rope_original_max"] = raw.get("max_position_embeddings")
    if out["rope_type"] == "yarn" and out.get("rope_factor") is None and not raw.get("max_position_embeddings"):
        raise ConfigError(f"config.json field '{key}.factor' is missing", given="missing",
                          expected="the YaRN scaling factor (or max_position_embeddings to derive it from)")
    if out["rope_type"] == "longrope":
        for name in ("short_factor", "long_factor"):
            if out.get(_KEYS[name]) is None:
                raise ConfigError(f"config.json field '{key}.{name}' is missing", given="missing",
                                  expected="a list of rope_dim / 2 positive numbers (LongRoPE)")


def check_dims(cfg: MoEConfig, dim: int) -> None:
    """LongRoPE's factor lists hold one number per rotated pair: ConfigError otherwise."""
    for name in ("rope_short_factor", "rope_long_factor"):
        factors = getattr(cfg, name)
        if factors is not None and len(factors) != dim // 2:
            raise ConfigError(f"config.json field 'rope_scaling.{name[5:]}' has the wrong length",
                              given=f"{len(factors)} numbers", expected=f"{dim // 2} (the rotated width {dim} / 2)")


def _factor(cfg: MoEConfig) -> float:
    if cfg.rope_factor is not None:
        return float(cfg.rope_factor)
    return cfg.max_position_embeddings / float(cfg.rope_original_max or cfg.max_position_embeddings)


def _base(cfg: MoEConfig, dim: int) -> np.ndarray:
    """theta ** (2i / dim), [dim/2], as transformers computes it (float32 exponent)."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float32(cfg.rope_theta) ** exponent).astype(np.float32)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq(cfg: MoEConfig, dim: int | None = None) -> np.ndarray:
    """[dim/2] float32 frequencies: plain, YaRN's blend, or LongRoPE's short factors."""
    dim = dim or cfg.head_dim
    base = _base(cfg, dim)
    if cfg.rope_type == "yarn":
        return _yarn(cfg, dim, base)
    if cfg.rope_type == "longrope":
        check_dims(cfg, dim)
        return (1.0 / (np.asarray(cfg.rope_short_factor, dtype=np.float32) * base)).astype(np.float32)
    return (1.0 / base).astype(np.float32)


def long_inv_freq(cfg: MoEConfig, dim: int | None = None) -> np.ndarray | None:
    """LongRoPE's long-factor frequencies (used when max(pos) + 1 > original); None for other types."""
    if cfg.rope_type != "longrope":
        return None
    dim = dim or cfg.head_dim
    check_dims(cfg, dim)
    return (1.0 / (np.asarray(cfg.rope_long_factor, dtype=np.float32) * _base(cfg, dim))).astype(np.float32)


def _yarn(cfg: MoEConfig, dim: int, base: np.ndarray) -> np.ndarray:
    factor, original = _factor(cfg), float(cfg.rope_original_max or cfg.max_position_embeddings)
    fast, slow = cfg.rope_beta_fast or 32.0, cfg.rope_beta_slow or 1.0

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(cfg.rope_theta))

    low, high = correction_dim(fast), correction_dim(slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    inv_extra = (1.0 / base).astype(np.float32)
    inv_inter = (1.0 / (np.float32(factor) * base)).astype(np.float32)
    return (inv_inter * (1 - extrapolation) + inv_extra * extrapolation).astype(np.float32)


def attention_factor(cfg: MoEConfig) -> float:
    """What cos and sin are multiplied by (1.0 for plain RoPE)."""
    if cfg.rope_type == "default":
        return 1.0
    if cfg.rope_attention_factor is not None:
        return float(cfg.rope_attention_factor)
    factor = _factor(cfg)
    if cfg.rope_type == "yarn":
        if cfg.rope_mscale and cfg.rope_mscale_all_dim:
            return float(yarn_mscale(factor, cfg.rope_mscale) / yarn_mscale(factor, cfg.rope_mscale_all_dim))
        return yarn_mscale(factor)
    original = float(cfg.rope_original_max or cfg.max_position_embeddings)
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def mscale_scale(cfg: MoEConfig) -> float:
    """DeepSeek's extra softmax-scale factor: mscale(factor, mscale_all_dim) ** 2 under YaRN with
    ``mscale_all_dim`` set (transformers' ``yarn_apply_mscale``), else 1.0."""
    if cfg.rope_type == "default" or not cfg.rope_mscale_all_dim:
        return 1.0
    m = yarn_mscale(float(cfg.rope_factor if cfg.rope_factor is not None else _factor(cfg)), cfg.rope_mscale_all_dim)
    return m * m

