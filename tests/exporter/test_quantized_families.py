"""``--quantize`` on every family: the export computes what transformers' own model computes with
the same dequantized weights (<= 1e-4 over a prefill + greedy steps), so shared experts, dense
layers, biases and q/k norms are quantized where they should be and routers, gates and norms not.
One MoE layer per family (``small_config``), hidden 72: int4 blocks of 32 leave a partial block."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mixport import quant
from mixport.exporter.tiny import write_tiny
from tests.exporter import parity
from tests.exporter.test_family_export import FAMILIES, cli_export, hf_model, small_config
from tests.helpers import require_module

require_module("transformers")

# never quantized (the issue: router, norms, embedding lookup; lm_head unless asked; a one-column gate)
FLOAT = re.compile(r"embed_tokens|lm_head|(^|\.)gate\.weight$|router|shared_expert_gate|_bias$")
# GPT-OSS keeps its stacked experts [E, in, out] (gate_up_proj [E, H, 2F]), unlike every Linear [out, in]
IN_OUT = {"gpt_oss": re.compile(r"experts\.(gate_up_proj|down_proj)$")}


def fake_quantize(model: torch.nn.Module, scheme: quant.Scheme, family: str = "") -> list[str]:
    """Each 2-D / 3-D weight of transformers' model but FLOAT ones (biases included) -> its dequantized
    value (blocks along the input axis: torch's last, or the one before for an [in, out] stack); the
    names replaced."""
    done = []
    in_out = IN_OUT.get(family)
    for name, param in model.named_parameters():
        if param.ndim in (2, 3) and not FLOAT.search(name):
            axis = -2 if in_out is not None and in_out.search(name) else -1
            w = param.detach().numpy()
            param.data = torch.from_numpy(quant.dequantized(quant.quantize(w, scheme, axis=axis)).copy())
            done.append(name)
    return done


@pytest.mark.parametrize("family", list(FAMILIES))
def test_quantized_family_matches_transformers_on_dequantized_weights(family: str, tmp_path: Path) -> None:
    src = write_tiny(tmp_path / "src", small_config(family), seed=5)
    out = cli_export(src, tmp_path / "out", "--quantize", "int4", "--block-size", "32")
    model = hf_model(src, family)
    replaced = fake_quantize(model, quant.Scheme(4, 32), family)
    assert any("experts" in n or "input_linear" in n for n in replaced) and any("o_proj" in n for n in replaced)
    ids, mask = parity.left_padded_prompt(model.config.vocab_size)
    want = parity.greedy(parity.HfStepper(model), ids, mask, 8)
    got = parity.greedy(parity.OrtStepper(parity.plain_session(out / "model.onnx", parity.EXACT_QDQ)),
                        ids, mask, 8)
    assert parity.max_logit_error(got, want, mask) <= 1e-4
    assert np.array_equal(got.tokens, want.tokens)
