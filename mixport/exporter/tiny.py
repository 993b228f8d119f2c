"""The built-in tiny model: Mixtral architecture, seeded random weights, a tokenizer built in code.

It is a real Hugging Face folder (config.json, model.safetensors with the hub's
parameter names, tokenizer.json, tokenizer_config.json) so every path mixport
takes on a downloaded checkpoint runs on it unchanged, without a model hub.
``write_tiny`` writes the built-in Mixtral itself (no transformers needed) and every other
family with transformers' own config and model class (``Adapter.hf_class``, ``save_pretrained``):
the hub's key layout, written by the code that defines it (``cfg.model_type`` picks the family).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from mixport.models import MoEConfig, registry

CORPUS = """\
The mixture of experts routes every token to a few of its feed forward experts.
A router scores the experts, keeps the top two, and sums their outputs by weight.
Sparse models read only the weights of the experts they pick, so they run fast.
Once upon a time a small model learned to write short stories about the sea.
The ship sailed north, the wind was cold, and the sailors sang an old song.
Parity is proven, not hoped for: every backend must agree on every token.
def generate(prompt, steps): return [sample(logits) for _ in range(steps)]
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000 2026
"""

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)

TINY = MoEConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                 num_experts_per_tok=2, head_dim=16, max_position_embeddings=512,
                 rope_theta=10000.0)

# The issues' benchmark model: Mixtral's shape at 1/8 width (about 490 MB of fp32 weights).
MINI_MIXTRAL = MoEConfig(vocab_size=32000, hidden_size=512, intermediate_size=1792, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                         num_experts_per_tok=2, head_dim=64, max_position_embeddings=4096, rope_theta=1e6)

# Its Qwen3-MoE counterpart (issue 11's numbers): the same vocab, width, depth and heads; 32 narrower experts,
# top-4, renormalized (released Qwen3-MoE configs set norm_topk_prob true), per-head q/k RMSNorm, no dense
# layer (about 494 MB of fp32 weights; a decode token reads half the expert weights the mini-Mixtral's does).
MINI_QWEN3_MOE = MoEConfig(vocab_size=32000, hidden_size=512, intermediate_size=448, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, num_local_experts=32,
                           num_experts_per_tok=4, head_dim=64, max_position_embeddings=4096, rope_theta=1e6,
                           rms_norm_eps=1e-6, model_type="qwen3_moe", qk_norm="head", normalization="renormalize")


def build_tokenizer(vocab_size: int = 512):  # -> tokenizers.Tokenizer
    """A byte-level BPE trained on CORPUS: deterministic, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return tok


def random_state(cfg: MoEConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights under the hub's names; the router is scaled up so routing is decisive."""
    from mixport.exporter.loader import expected_shapes

    adapter = registry.for_config(cfg)
    routers = {adapter.router_weight(i) for i in adapter.moe_layers(cfg)}
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(cfg).items():
        state[adapter.hub_name(name)] = _seeded(name, shape, name in routers, gen).contiguous()
    return state


def _seeded(name: str, shape: torch.Size, routers: bool, gen: torch.Generator) -> torch.Tensor:
    """One seeded weight: norms near 1, routers and embeddings N(0, 1), others N(0, 1/fan_in)."""
    if len(shape) == 1 and "norm" in name:
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if len(shape) == 1:  # a bias
        return 0.1 * torch.randn(shape, generator=gen)
    std = 1.0 if routers or "embed" in name else shape[-1] ** -0.5
    return std * torch.randn(shape, generator=gen)


def write_with_transformers(out_dir: Path, cfg: MoEConfig, seed: int) -> None:
    """config.json + safetensors written by transformers' own class for ``cfg``'s family, its
    parameters re-drawn from ``seed`` (routers scaled up, so routing is decisive)."""
    adapter = registry.for_config(cfg)
    cls = adapter.transformers_class()
    hf_config = cls.config_class(**adapter.to_hf_dict(cfg))
    torch.manual_seed(seed)
    model = cls(hf_config).eval()
    gen = torch.Generator().manual_seed(seed)
    routers = {f"layers.{i}.{adapter.router_path}" for i in adapter.moe_layers(cfg)}
    with torch.no_grad():
        for name, param in model.named_parameters():
            plain = name.removeprefix("model.")
            is_router = any(plain.startswith(r) for r in routers) or ".router." in plain
            if param.numel():  # e.g. Qwen2-MoE's shared expert of width 0
                param.copy_(_seeded(plain, param.shape, is_router, gen))
    model.save_pretrained(out_dir, safe_serialization=True)


def write_tiny(out_dir: Path, cfg: MoEConfig | None = None, seed: int = 0) -> Path:
    """Write a complete HF folder for ``cfg`` (default: the built-in tiny Mixtral config)."""
    from safetensors.torch import save_file

    cfg = cfg or TINY
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(min(cfg.vocab_size, 512))
    cfg = replace(cfg, vocab_size=max(cfg.vocab_size, tok.get_vocab_size()))
    if cfg.model_type == TINY.model_type:
        (out_dir / "config.json").write_text(json.dumps(registry.for_config(cfg).to_hf_dict(cfg), indent=2))
        save_file(random_state(cfg, seed), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        write_with_transformers(out_dir, cfg, seed)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "chat_template": CHAT_TEMPLATE}, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, indent=2))
    return out_dir
