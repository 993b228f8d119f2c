"""mixport's reference model against transformers' own class for each family (fp32, <= 1e-5).

The family's adapter names the transformers class (``Adapter.hf_class``); a new family adds
its tiny configurations to CASES (and ``test_every_family_has_cases`` fails until it does).
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mixport.exporter.loader import load_reference
from mixport.exporter.tiny import write_tiny
from mixport.models import registry
from tests.conftest import tiny_config
from tests.helpers import require_module

transformers = require_module("transformers")  # skips locally, fails under CI=true

CASES = {  # model_type -> {case: changes to the tiny config}
    "mixtral": {
        "tiny": {},
        "sliding-window": {"sliding_window": 4},
        "mha-top1-e4": {"num_key_value_heads": 4, "num_experts_per_tok": 1, "num_local_experts": 4},
        "gqa4-h72": {"hidden_size": 72, "head_dim": 18, "num_key_value_heads": 1, "intermediate_size": 40},
    },
}
PARAMS = [pytest.param(model_type, changes, id=f"{model_type}-{name}")
          for model_type, cases in CASES.items() for name, changes in cases.items()]


def _hf(folder: Path, model_type: str):  # -> the family's transformers model, e.g. MixtralForCausalLM
    cls = registry.get(model_type).transformers_class()
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def _cache_arg(hf: object) -> str:
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


def test_every_family_has_cases() -> None:
    assert sorted(CASES) == sorted(a.model_type for a in registry.ADAPTERS)


@pytest.mark.parametrize(("model_type", "changes"), PARAMS)
def test_prefill_and_decode_match_transformers(model_type: str, changes: dict, tmp_path: Path) -> None:
    folder = write_tiny(tmp_path / "src", replace(tiny_config(**changes), model_type=model_type), seed=3)
    ref, cfg, _ = load_reference(folder)
    assert cfg.model_type == model_type
    hf = _hf(folder, model_type)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in row 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours, past = ref(ids, mask, pos, ref.empty_past(2))
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        valid = mask.bool()
        assert (ours[valid] - theirs.logits[valid]).abs().max() <= 1e-5
        # one decode step on top of each cache
        nxt = ours[:, -1:].argmax(-1)
        mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos2 = pos[:, -1:] + 1
        ours2, _ = ref(nxt, mask2, pos2, past)
        cache = getattr(theirs, "cache", None) or theirs.past_key_values
        theirs2 = hf(input_ids=nxt, attention_mask=mask2, position_ids=pos2, use_cache=True,
                     **{_cache_arg(hf): cache})
    assert (ours2 - theirs2.logits).abs().max() <= 1e-5


def test_eager_sparse_equals_dense_experts(tiny_dir: Path) -> None:
    """The eager path (selected experts only) and the traced dense path agree."""
    ref, cfg, _ = load_reference(tiny_dir)
    adapter = registry.for_config(cfg)
    router = ref.get_submodule(f"layers.0.{adapter.router_path}")
    experts = ref.get_submodule(f"layers.0.{adapter.experts_path}")
    x = torch.randn(13, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        w, ids = router(x)
        sparse = experts(x, w, ids)
        dense = experts._dense(x, w, ids)
    assert (sparse - dense).abs().max() <= 1e-5
