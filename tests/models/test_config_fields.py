"""Every config.json field mixport reads: a wrong type, a value out of range, and the right value
still accepted, each through the family's adapter; `mixport export` on a bad folder is one line and
leaves nothing behind."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from mixport import config_fields
from mixport.errors import ConfigError
from mixport.models import registry
from mixport.models.adapter import COMMON
from mixport.models.config import MoEConfig, field_names
from tests.conftest import tiny_config
from tests.helpers import invoke, one_line_error

ADAPTER = registry.get("mixtral")
RAW = ADAPTER.to_hf_dict(tiny_config())  # vocab 512, hidden 64, 4 heads, 2 kv heads, head_dim 16, 8 experts

# config.json key: (a wrong type, a value out of range (None: every value of the type is in range),
#                   a right value other than the tiny model's, the MoEConfig field and value it gives)
CASES: dict[str, tuple[Any, Any, Any, str, Any]] = {
    "vocab_size": ("512", 2**31, 600, "vocab_size", 600),
    "hidden_size": (True, 0, 96, "hidden_size", 96),
    "intermediate_size": (96.0, -1, 40, "intermediate_size", 40),
    "num_hidden_layers": ([2], 2**20, 3, "num_hidden_layers", 3),
    "num_attention_heads": ("4", 0, 8, "num_attention_heads", 8),
    "num_key_value_heads": ("2", 0, 4, "num_key_value_heads", 4),
    "num_local_experts": ({"n": 8}, 0, 4, "num_local_experts", 4),
    "num_experts_per_tok": (2.5, 0, 1, "num_experts_per_tok", 1),
    "head_dim": ("16", -16, 32, "head_dim", 32),
    "rms_norm_eps": ("1e-5", 0.0, 1e-6, "rms_norm_eps", 1e-6),
    "rope_theta": ("abc", -1.0, 500000, "rope_theta", 500000.0),
    "max_position_embeddings": ("512", 0, 4096, "max_position_embeddings", 4096),
    "sliding_window": ("16", -5, 256, "sliding_window", 256),
    "tie_word_embeddings": ("no", None, True, "tie_word_embeddings", True),
    "bos_token_id": (1.0, -1, 5, "bos_token_id", 5),
    "eos_token_id": ("2", 512, [2, 7], "eos_token_id", [2, 7]),
    "pad_token_id": ([0], -1, 0, "pad_token_id", 0),
}
FLOATS_OUT = {"rms_norm_eps": [math.nan, math.inf, 2.0], "rope_theta": [math.nan, math.inf, 0]}


def _read(**changes: Any) -> MoEConfig:
    raw = {k: v for k, v in {**RAW, **changes}.items() if v is not _DROP}
    return registry.find(raw).config_from_hf(raw)


_DROP = object()


def _fails(key: str, value: Any, **more: Any) -> str:
    if key == "rope_theta":  # rope_parameters' theta wins over the top-level one
        more.setdefault("rope_parameters", _DROP)
    with pytest.raises(ConfigError) as info:
        _read(**{key: value}, **more)
    text = str(info.value)
    assert "\n" not in text and f"'{key}'" in text, text
    assert f"given: {json.dumps(value)[:20]}" in text or "given: a list" in text or "given: an object" in text, text
    return text


def test_every_config_field_is_declared_once() -> None:
    """Every field a Mixtral config.json names has its cases here; the fields other families read from their
    own keys have theirs in tests/models/test_families.py."""
    assert tuple(config_fields.FIELDS) == field_names()
    assert set(CASES) | {"normalization", "model_type"} == set(COMMON)


@pytest.mark.parametrize("key", list(CASES))
def test_a_wrong_type_is_one_line_naming_the_key(key: str) -> None:
    _fails(key, CASES[key][0])


@pytest.mark.parametrize("key", [k for k, case in CASES.items() if case[1] is not None])
def test_a_value_out_of_range_is_one_line_naming_the_key(key: str) -> None:
    for value in [CASES[key][1], *FLOATS_OUT.get(key, [])]:
        _fails(key, value)


@pytest.mark.parametrize("key", list(CASES))
def test_the_right_value_is_still_accepted(key: str) -> None:
    *_, good, field, value = CASES[key]
    more = {"rope_parameters": _DROP} if key == "rope_theta" else {}
    cfg = _read(**{key: good}, **more)
    assert getattr(cfg, field) == value and type(getattr(cfg, field)) is type(value)
    assert _read() == tiny_config()


@pytest.mark.parametrize(("changes", "fragments"), [
    ({"num_key_value_heads": 8}, ["'num_key_value_heads' exceeds 'num_attention_heads'", "8 > 4"]),
    ({"num_key_value_heads": 3}, ["'num_attention_heads' is not a multiple of 'num_key_value_heads'"]),
    ({"head_dim": 15}, ["'head_dim' must be an even integer"]),  # RoPE rotates pairs
    ({"head_dim": _DROP, "hidden_size": 66}, ["no head_dim", "'hidden_size' is not a multiple of "
                                                            "'num_attention_heads'", "66 / 4"]),
    ({"eos_token_id": [2, 600]}, ["'eos_token_id' is outside the vocabulary", "600 (vocab_size 512)"]),
    ({"pad_token_id": 512}, ["'pad_token_id' is outside the vocabulary"]),
    ({"bos_token_id": 700, "vocab_size": 600}, ["'bos_token_id' is outside the vocabulary", "[0, 600)"]),
    ({"num_experts_per_tok": 9}, ["'num_experts_per_tok' exceeds 'num_local_experts'"]),
    ({"architectures": 5}, ["'architectures' must be a list", "given: 5"]),
    ({"architectures": ["MixtralForCausalLM", 3]}, ["'architectures' must be a list"]),
    ({"model_type": 5, "architectures": _DROP}, ["'model_type' must be a string"]),
    ({"rope_parameters": [1, 2]}, ["'rope_parameters' must be an object", "given: a list"]),
    ({"rope_parameters": {"rope_type": 5}}, ["'rope_parameters.rope_type' must be a string"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "1e4"}}, ["'rope_parameters.rope_theta' must be"]),
    ({"rope_scaling": "linear"}, ["'rope_scaling' must be an object"]),
    ({"rope_theta": float("inf")}, ["'rope_theta' must be", "Infinity"]),  # beside rope_parameters' (which wins)
    ({"hidden_size": None}, ["'hidden_size' must be a positive integer", "given: null"]),
    ({"tie_word_embeddings": None}, ["'tie_word_embeddings' must be true or false", "given: null"]),  # as transformers
    ({"rms_norm_eps": None}, ["'rms_norm_eps' must be a finite number", "given: null"]),
    ({"max_position_embeddings": None}, ["'max_position_embeddings' must be a positive integer", "given: null"]),
    ({"model_type": "llama"}, ["'model_type' contradicts its architectures", '"llama"', '"mixtral"']),
    ({"model_type": ""}, ["'model_type' contradicts its architectures"]),
    ({"rope_scaling": {"type": "dynamic"}}, ["unsupported rotary embedding scaling", "dynamic"]),  # beside a
    #                                          default rope_parameters: any scaling is refused
])
def test_checks_across_fields_and_of_nested_keys(changes: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        _read(**changes)
    assert "\n" not in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_null_optional_fields_and_an_explicit_head_dim_are_accepted() -> None:
    cfg = _read(sliding_window=None, pad_token_id=None, eos_token_id=[], num_key_value_heads=None,
                head_dim=32, hidden_size=96)  # num_attention_heads * head_dim need not be hidden_size
    assert (cfg.sliding_window, cfg.pad_token_id, cfg.eos_token_id) == (None, None, [])
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size) == (4, 32, 96)  # no kv heads: one per head
    assert _read(head_dim=_DROP).head_dim == 16  # hidden_size // num_attention_heads


@pytest.mark.parametrize(("key", "value"), [
    ("num_key_value_heads", "2"), ("head_dim", -16), ("rope_theta", "abc"), ("rope_parameters", [1]),
    ("hidden_size", True), ("architectures", 5), ("max_position_embeddings", 0), ("sliding_window", -5),
])
def test_export_of_a_bad_config_is_one_line_and_leaves_nothing(tiny_dir: Path, tmp_path: Path, key: str,
                                                               value: Any) -> None:
    """The issue's cases: tracebacks or silent accepts before; now one line, exit 1, no OUT, no staging."""
    src = tmp_path / "src"
    src.mkdir()
    for f in tiny_dir.iterdir():
        (src / f.name).symlink_to(f)
    raw = json.loads((tiny_dir / "config.json").read_text())
    raw[key] = value
    if key == "rope_theta":
        raw.pop("rope_parameters")
    (src / "config.json").unlink()
    (src / "config.json").write_text(json.dumps(raw))
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    one_line_error(invoke("export", src, "-o", out), f"'{key}'")
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("text", ["[" * 100000, '{"vocab_size": ' + "1" * 5000 + "}",
                                  json.dumps({**RAW, "vocab_size": 512.5}).replace("512.5", "1e400")])
def test_hostile_json_is_one_line(tiny_dir: Path, tmp_path: Path, text: str) -> None:
    """Deep nesting (RecursionError), a 5000-digit int (ValueError), an infinite number."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(text)
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    one_line_error(invoke("export", src, "-o", out), "config.json")
    assert list(out.parent.iterdir()) == []
