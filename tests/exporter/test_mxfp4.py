"""GPT-OSS hub checkpoints hold the expert weights as MXFP4 ``*_blocks`` / ``*_scales`` pairs
(exporter/mxfp4.py): read, they are exactly transformers' own dequantization
(``integrations.mxfp4.convert_moe_packed_tensors``), one expert at a time.

The MXFP4 folder is written here: a tiny GPT-OSS folder written by transformers, its stacked
expert weights replaced by random FP4 codes and power-of-two scales (and config.json given the hub's
``quantization_config``); its twin holds transformers' dequantization of the same codes as plain
``gate_up_proj`` / ``down_proj``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixport.exporter import mxfp4
from mixport.exporter.checkpoint import load_state_dict
from mixport.exporter.config import load_config
from mixport.exporter.loader import expected_shapes
from mixport.exporter.tiny import write_tiny
from mixport.models import registry
from tests.conftest import tiny_config
from tests.helpers import require_module

require_module("transformers")

CFG = replace(tiny_config(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_local_experts=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                          sliding_layers=(0,)), model_type="gpt_oss")  # hidden and F: multiples of 32


def _packed(shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 blocks [E, R, G, 16] and scales [E, R, G] (exponents 2^-4 .. 2^3)."""
    blocks = torch.randint(0, 256, (*shape, 16), generator=gen, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(123, 131, shape, generator=gen, dtype=torch.int32).to(torch.uint8)
    return blocks, scales


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the MXFP4 folder, its dense twin)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    root = tmp_path_factory.mktemp("mxfp4")
    packed_dir = write_tiny(root / "mxfp4", CFG, seed=1)
    dense_dir = write_tiny(root / "dense", CFG, seed=1)
    state = load_file(packed_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    h, f, e = CFG.hidden_size, CFG.intermediate_size, CFG.num_local_experts
    for i in range(CFG.num_hidden_layers):
        for name, rows, cols in (("gate_up_proj", 2 * f, h), ("down_proj", h, f)):
            key = f"model.layers.{i}.mlp.experts.{name}"
            blocks, scales = _packed((e, rows, cols // 32), gen)
            dense = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # transformers' reading
            assert dense.shape == state[key].shape
            del state[key]
            state[key + "_blocks"], state[key + "_scales"] = blocks, scales
            dense_state = load_file(dense_dir / "model.safetensors")
            dense_state[key] = dense.contiguous()
            save_file(dense_state, str(dense_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(state, str(packed_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((packed_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (packed_dir / "config.json").write_text(json.dumps(config))
    return packed_dir, dense_dir


def test_mxfp4_experts_read_as_transformers_dequantizes_them(folders: tuple[Path, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    packed_dir, dense_dir = folders
    cfg = load_config(packed_dir)[0]
    assert cfg == load_config(dense_dir)[0]
    seen: list[tuple[int, ...]] = []
    real = mxfp4.dequantize
    monkeypatch.setattr(mxfp4, "dequantize", lambda b, s: (seen.append(tuple(b.shape)), real(b, s))[1])
    ours = load_state_dict(packed_dir, cfg, expected_shapes(cfg), torch.float32)
    want = load_state_dict(dense_dir, cfg, expected_shapes(cfg), torch.float32)
    assert sorted(ours) == sorted(want)
    for name in want:
        assert torch.equal(ours[name], want[name]), name
    gate = ours[registry.get("gpt_oss").expert_weight(1, 2, "gate")]
    assert gate.abs().max() > 1 and len(torch.unique(gate.abs())) > 8  # really the codes times the scales
    h, f = CFG.hidden_size, CFG.intermediate_size
    assert set(seen) == {(2 * f, h // 32, 16), (h, f // 32, 16)}  # one expert's blocks per read, never the stack


def test_mxfp4_blocks_without_matching_scales_are_one_line(folders: tuple[Path, Path], tmp_path: Path) -> None:
    from mixport.errors import CheckpointError

    packed_dir, _ = folders
    state = load_file(packed_dir / "model.safetensors")
    key = "model.layers.0.mlp.experts.down_proj_scales"
    state[key] = state[key][:, :, :0].contiguous()
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(state, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((packed_dir / "config.json").read_text())
    cfg = load_config(bad)[0]
    with pytest.raises(CheckpointError) as info:
        load_state_dict(bad, cfg, expected_shapes(cfg), torch.float32)
    assert "MXFP4 tensor 'model.layers.0.mlp.experts.down_proj'" in str(info.value) and "\n" not in str(info.value)
