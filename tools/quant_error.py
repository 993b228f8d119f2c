"""How much each quantization scheme changes a model's outputs (issue 12: choose the defaults by
measurement): transformers' own model with its weights replaced by their dequantized values --
exactly what a `mixport export --quantize` file computes (tests/exporter/test_quantized_export.py
proves that to 1e-4) -- vs the same model in fp32, teacher-forced on one prompt.

Per scheme: max and RMS |logit error|, top-1 agreement, expert-selection agreement per token and
layer, and the weight bytes. Run: python tools/quant_error.py [--model mini|tiny] [--tokens 256]
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from mixport import quant
from mixport.exporter.tiny import MINI_MIXTRAL, TINY, write_tiny

FLOAT = re.compile(r"embed_tokens|lm_head|(^|\.)gate\.weight$|router|shared_expert_gate")
SCHEMES = [quant.Scheme(8, b) for b in quant.BLOCK_SIZES] + \
    [quant.Scheme(4, b, sym) for sym in (True, False) for b in quant.BLOCK_SIZES]


def outputs(model: torch.nn.Module, ids: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits [T, V] and each layer's router picks [T, k] (the router's own top-k of its logits)."""
    picks: list[np.ndarray] = []
    k = model.config.num_experts_per_tok
    hooks = [m.register_forward_hook(lambda _m, _i, out: picks.append(
        torch.topk(out if torch.is_tensor(out) else out[0], k, dim=-1).indices.sort(-1).values.numpy()))
        for n, m in model.named_modules() if n.endswith("mlp.gate") or n.endswith("block_sparse_moe.gate")]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float().numpy()
    for h in hooks:
        h.remove()
    return logits, picks


def fake_quantize(model: torch.nn.Module, scheme: quant.Scheme, lm_head: bool) -> int:
    """Dequantized weights in place (blocks along the input axis); the quantized bytes."""
    size = 0
    for name, p in model.named_parameters():
        if p.ndim in (2, 3) and (not FLOAT.search(name) or (lm_head and name == "lm_head.weight")):
            qz = quant.quantize(p.detach().numpy(), scheme, axis=-1)
            p.data = torch.from_numpy(quant.dequantized(qz).copy())
            size += qz.q.size * scheme.bits // 8 + qz.scale.nbytes + (0 if qz.zero is None else qz.zero.size // 2)
    return size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["mini", "tiny"], default="mini")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--lm-head", action="store_true", help="Quantize lm_head too.")
    args = ap.parse_args()
    import transformers

    torch.set_num_threads(2)
    cfg = MINI_MIXTRAL if args.model == "mini" else TINY
    with tempfile.TemporaryDirectory() as tmp:
        src = write_tiny(Path(tmp), cfg)
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        ids = torch.from_numpy(np.random.default_rng(0).integers(3, cfg.vocab_size, (1, args.tokens)))
        ref, ref_picks = outputs(model, ids)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        print(f"{args.model}: {args.tokens} tokens, logit scale (max |logit|) {np.abs(ref).max():.2f}, "
              f"lm_head {'quantized' if args.lm_head else 'fp32'}")
        print(f"{'scheme':10} {'block':>5} {'max err':>8} {'rms err':>8} {'top-1':>7} {'experts':>8} {'MB':>7}")
        for scheme in SCHEMES:
            model.load_state_dict(state)
            size = fake_quantize(model, scheme, args.lm_head)
            got, picks = outputs(model, ids)
            err = np.abs(got - ref)
            top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
            experts = float(np.mean([np.all(a == b, axis=-1).mean() for a, b in zip(picks, ref_picks, strict=True)]))
            print(f"{scheme.name:10} {scheme.block_size:5d} {err.max():8.4f} {np.sqrt((err ** 2).mean()):8.4f} "
                  f"{top1:7.3f} {experts:8.3f} {size / 1e6:7.1f}")


if __name__ == "__main__":
    main()
