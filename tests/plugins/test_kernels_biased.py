"""The Triton kernels of the MoE contract's version "3" (expert biases + the clamped SwiGLU, GPT-OSS)
vs the float64 NumPy reference, in the CPU interpreter (``triton_interpret``: see conftest).

# T tokens, E experts, H hidden, F intermediate, k active
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import require_module

torch = require_module("torch")
require_module("triton")

from mixport.errors import MixportError  # noqa: E402
from mixport.plugins import kernels as K  # noqa: E402
from mixport.plugins.kernels.api import fused_moe_biased  # noqa: E402

pytestmark = pytest.mark.triton_interpret

H, F, LIMIT, ALPHA = 80, 96, 2.0, 1.702
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def _layer(t: int, e: int, k: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random layer whose gate / up values cross the limit, top-k of random logits then softmax."""
    g = torch.Generator().manual_seed(seed)
    w, ids = K.reference_routing(torch.randn(t, e, generator=g), k, "none", "topk_softmax")
    return {"hidden": (2 * torch.randn(t, H, generator=g)).to(dtype), "weights": torch.from_numpy(w).to(dtype),
            "ids": torch.from_numpy(ids), "gate_up": (torch.randn(e, H, 2 * F, generator=g) * 0.2).to(dtype),
            "down": (torch.randn(e, F, H, generator=g) / F**0.5).to(dtype),
            "gate_up_bias": torch.randn(e, 2 * F, generator=g).to(dtype),
            "down_bias": torch.randn(e, H, generator=g).to(dtype)}


def _check(got: torch.Tensor, ref: np.ndarray, tol: float) -> None:
    scale = max(float(np.abs(ref).max()), 1e-6)
    err = float(np.abs(got.float().numpy() - ref).max())
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol:.1g} * {scale:.3g}"


@pytest.mark.parametrize("t", [1, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ["swiglu_clamped", "swiglu"])
def test_biased_moe_matches_reference(t: int, dtype: torch.dtype, activation: str) -> None:
    layer = _layer(t, 8, 2, dtype, seed=t)
    out = fused_moe_biased(**layer, activation=activation, alpha=ALPHA, limit=LIMIT)
    assert out.shape == (t, H) and out.dtype == dtype
    want = K.reference_moe(**layer, activation=activation, alpha=ALPHA, limit=LIMIT)
    _check(out, want, TOL[dtype])
    if activation == "swiglu_clamped" and t > 1:  # the clamps engaged, and the biases count
        assert np.abs(K.reference_moe(**layer) - want).max() > 0.1
        plain = {n: v for n, v in layer.items() if not n.endswith("_bias")}
        assert np.abs(K.reference_moe(**plain, activation=activation, alpha=ALPHA, limit=LIMIT) - want).max() > 0.1


def test_biased_moe_refuses_misshapen_biases() -> None:
    layer = _layer(5, 8, 2, torch.float32)
    layer["down_bias"] = layer["down_bias"][:, :-1]
    with pytest.raises(MixportError, match="down_bias has the wrong shape"):
        fused_moe_biased(**layer)
    with pytest.raises(MixportError, match="unknown activation"):
        fused_moe_biased(**_layer(5, 8, 2, torch.float32), activation="gelu")
