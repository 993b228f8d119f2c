"""The fast ONNX Runtime graph routes every TopKRouting version-3 mode as the reference model does:
sigmoid scores with a selection-only bias and top-2-sum groups (DeepSeek-V3 style), softmax with max
groups and a routed scaling factor (DeepSeek-V2 style), sparsemixer (PhiMoE's routing). Built from a
reference model's own weights (Mixtral layout, the routing switched by config), prefill logits compared."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mixport.models.components import DecoderModel
from mixport.models.config import MoEConfig
from mixport.runtime import ort_graph

ROUTINGS = {
    "v3": dict(scoring="sigmoid", selection_bias=True, n_group=4, topk_group=2, group_score="top2_sum",
               routed_scaling_factor=2.5, num_experts_per_tok=3),
    "v2": dict(n_group=4, topk_group=2, group_score="max", routed_scaling_factor=16.0, normalization="none"),
    "sparsemixer": dict(scoring="sparsemixer", sparsemixer_eps=0.1, normalization="none"),
}


def _model(routing: dict) -> DecoderModel:
    cfg = MoEConfig(**{**dict(vocab_size=96, hidden_size=48, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, num_local_experts=8,
                              num_experts_per_tok=2, head_dim=16, max_position_embeddings=64), **routing})
    torch.manual_seed(0)
    model = DecoderModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (1.0 if "gate" in name or "embed" in name else p.shape[-1] ** -0.5))
    return model


def _fast_logits(model: DecoderModel, ids: np.ndarray) -> np.ndarray:
    cfg = model.cfg
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    proto = ort_graph.build(weights, dataclasses.asdict(cfg), "fp32")
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    b, s = ids.shape
    feed = {"input_ids": ids, "seqlens_k": np.full(b, s - 1, np.int32),
            "total_sequence_length": np.array(s, np.int32), "logits_index": np.arange(s, dtype=np.int64)}
    for i in range(cfg.num_hidden_layers):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros((b, 1, cfg.max_position_embeddings, 16), np.float32)
    return sess.run(["logits"], feed)[0]


@pytest.mark.parametrize("name", ROUTINGS)
def test_fast_graph_routes_like_the_reference(name: str) -> None:
    model = _model(ROUTINGS[name])
    assert ort_graph.supported(dataclasses.asdict(model.cfg), "fp32") is None
    ids = np.random.default_rng(1).integers(0, 96, (1, 9)).astype(np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), torch.ones(1, 9, dtype=torch.int64), torch.arange(9)[None],
                    model.empty_past(1))[0][0].numpy()
    if ROUTINGS[name].get("selection_bias"):
        with torch.no_grad():
            for layer in model.layers:
                layer.block_sparse_moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.4, 0.4, 8))
            ref = model(torch.from_numpy(ids), torch.ones(1, 9, dtype=torch.int64), torch.arange(9)[None],
                        model.empty_past(1))[0][0].numpy()
    np.testing.assert_allclose(_fast_logits(model, ids), ref, atol=1e-4, rtol=1e-4)
    plain = _model({})  # the same weights routed the Mixtral way: far from the reference above
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "e_score" not in k})
    assert np.abs(_fast_logits(plain, ids) - ref).max() > 1e-3  # parity above: within 1e-4


def test_phimoe_config_falls_back_with_the_reason() -> None:
    cfg = dataclasses.asdict(MoEConfig(vocab_size=96, hidden_size=48, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                       num_experts_per_tok=2, head_dim=16, model_type="phimoe", norm_type="layer",
                                       lm_head_bias=True, scoring="sparsemixer", normalization="none"))
    why = ort_graph.supported(cfg, "fp32")
    assert why is not None and "PhimoeForCausalLM" in why
