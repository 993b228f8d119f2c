"""mixport's reference model against transformers' MixtralForCausalLM (fp32, <= 1e-5)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from mixport.exporter.loader import load_reference
from mixport.exporter.tiny import write_tiny
from tests.conftest import tiny_config
from tests.helpers import require_module

transformers = require_module("transformers")  # skips locally, fails under CI=true

CONFIGS = {
    "tiny": {},
    "sliding-window": {"sliding_window": 4},
    "mha-top1-e4": {"num_key_value_heads": 4, "num_experts_per_tok": 1, "num_local_experts": 4},
    "gqa4-h72": {"hidden_size": 72, "head_dim": 18, "num_key_value_heads": 1, "intermediate_size": 40},
}


def _hf(folder: Path):  # -> MixtralForCausalLM
    return transformers.MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _cache_arg(hf: object) -> str:
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_decode_match_transformers(name: str, tmp_path: Path) -> None:
    folder = write_tiny(tmp_path / name, tiny_config(**CONFIGS[name]), seed=3)
    ref, cfg, _ = load_reference(folder)
    hf = _hf(folder)
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
    block = ref.layers[0].block_sparse_moe
    x = torch.randn(13, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        w, ids = block.gate(x)
        sparse = block.experts(x, w, ids)
        dense = block.experts._dense(x, w, ids)
    assert (sparse - dense).abs().max() <= 1e-5
