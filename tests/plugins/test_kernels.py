"""Triton MoE kernels vs the float64 NumPy reference, in the CPU interpreter.

# T tokens, E experts, H hidden, F intermediate, k active

Sizes are tiny and not powers of two (H=80, F=96, T=37) so masks are
exercised and the whole file stays well under two minutes on two cores.
Every test here is ``triton_interpret``: it runs in a child pytest session with
TRITON_INTERPRET=1 (see conftest), never switching this process to the interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import require_module

torch = require_module("torch")
require_module("triton")

from mixport.errors import MixportError  # noqa: E402
from mixport.ops import ORDERS  # noqa: E402
from mixport.plugins import kernels as K  # noqa: E402
from mixport.plugins.kernels.configs import block_m_ranges, choose_block_m  # noqa: E402
from mixport.plugins.kernels.reference import reference_align  # noqa: E402
from mixport.plugins.kernels.workspace import carve, scratch_layout  # noqa: E402

pytestmark = pytest.mark.triton_interpret

H, F = 80, 96
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _layer(t: int, e: int, k: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random MoE layer and routing for T=t tokens, E=e experts, top-k."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g)
    w, ids = K.reference_routing(logits, k)
    return {
        "hidden": torch.randn(t, H, generator=g).to(dtype),
        "weights": torch.from_numpy(w).to(dtype),
        "ids": torch.from_numpy(ids),
        "gate_up": (torch.randn(e, H, 2 * F, generator=g) / H**0.5).to(dtype),
        "down": (torch.randn(e, F, H, generator=g) / F**0.5).to(dtype),
    }


def _assert_close(got: torch.Tensor, ref: np.ndarray, tol: float) -> None:
    scale = max(float(np.abs(ref).max()), 1e-6)
    err = float(np.abs(got.float().numpy() - ref).max())
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol:.1g} * {scale:.3g}"


@pytest.mark.parametrize("t", [1, 37])
@pytest.mark.parametrize("e", [8, 16])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("normalization", ["renormalize", "none"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_routing_matches_reference(t: int, e: int, k: int, normalization: str, order: str,
                                   dtype: torch.dtype) -> None:
    logits = (torch.randn(t, e, generator=torch.Generator().manual_seed(t + e)) * 3).to(dtype)
    w, ids = K.topk_routing(logits, k, normalization, order)
    rw, rids = K.reference_routing(logits, k, normalization, order)
    assert w.dtype == dtype and ids.dtype == torch.int64 and w.shape == (t, k)
    np.testing.assert_array_equal(ids.numpy(), rids)
    np.testing.assert_allclose(w.float().numpy(), rw, rtol=TOL[dtype], atol=TOL[dtype] / 10)


@pytest.mark.parametrize(("e", "k"), [(60, 4), (64, 3), (128, 8)])  # Qwen3-MoE: 128 experts, top-8
@pytest.mark.parametrize("normalization", ["renormalize", "none"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_routing_many_experts(e: int, k: int, normalization: str, order: str, dtype: torch.dtype) -> None:
    """Wide rows (BLOCK_E up to 128, BLOCK_T 32) and k up to 8, as the Mixtral family's routers have."""
    logits = (torch.randn(37, e, generator=torch.Generator().manual_seed(e * k)) * 2).to(dtype)
    w, ids = K.topk_routing(logits, k, normalization, order)
    rw, rids = K.reference_routing(logits, k, normalization, order)
    np.testing.assert_array_equal(ids.numpy(), rids)
    np.testing.assert_allclose(w.float().numpy(), rw, rtol=TOL[dtype], atol=TOL[dtype] / 10)
    assert ids.max() < e and len(set(ids[0].tolist())) == k  # k distinct experts, none from padding


def test_routing_orders_differ_as_the_contract_says() -> None:
    """topk_softmax's k weights sum to 1 and equal softmax_topk + renormalize; softmax_topk + none does not."""
    logits = torch.randn(37, 16, generator=torch.Generator().manual_seed(7)) * 3
    w_ts, ids_ts = K.topk_routing(logits, 4, "none", "topk_softmax")
    w_sr, ids_sr = K.topk_routing(logits, 4, "renormalize", "softmax_topk")
    w_sn, _ = K.topk_routing(logits, 4, "none", "softmax_topk")
    assert torch.equal(ids_ts, ids_sr)
    np.testing.assert_allclose(w_ts.sum(1).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w_ts.numpy(), w_sr.numpy(), rtol=1e-5, atol=1e-7)
    assert float((1 - w_sn.sum(1)).max()) > 0.1  # softmax_topk + none: the k weights sum to less than 1


@pytest.mark.parametrize("order", ORDERS)
def test_routing_ties_pick_lower_expert_first(order: str) -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    w, ids = K.topk_routing(logits, 2, "none", order)
    np.testing.assert_array_equal(ids.numpy(), [[1, 2], [0, 1]])
    np.testing.assert_allclose(w[1].numpy(), [0.2, 0.2] if order == "softmax_topk" else [0.5, 0.5], rtol=1e-6)
    w, _ = K.topk_routing(logits, 2, "renormalize", order)
    np.testing.assert_allclose(w.numpy(), np.full((2, 2), 0.5), rtol=1e-6)
    w, ids = K.topk_routing(logits, 3, "none", order)
    np.testing.assert_array_equal(ids.numpy(), [[1, 2, 3], [0, 1, 2]])
    rw, rids = K.reference_routing(logits, 3, "none", order)
    np.testing.assert_array_equal(ids.numpy(), rids)
    np.testing.assert_allclose(w.numpy(), rw, rtol=1e-6)


def test_routing_rejects_bad_arguments() -> None:
    logits = torch.zeros(3, 4)
    with pytest.raises(MixportError, match="k must be"):
        K.topk_routing(logits, 5)
    with pytest.raises(MixportError, match="normalization"):
        K.topk_routing(logits, 2, "softmax")
    with pytest.raises(MixportError, match="unknown routing order"):
        K.topk_routing(logits, 2, "none", "sigmoid_topk")


@pytest.mark.parametrize("t,e,k,block_m", [(1, 8, 2, 16), (37, 8, 2, 16), (37, 16, 1, 32),
                                           (200, 8, 2, 64)])
def test_align_matches_reference(t: int, e: int, k: int, block_m: int) -> None:
    g = torch.Generator().manual_seed(t)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    ids[ids == 3] = 0                       # expert 3 gets no tokens
    sorted_ids, expert_ids, num_post = K.moe_align_block_size(ids, e, block_m)
    r_sorted, r_experts, r_post = reference_align(ids, e, block_m)
    assert sorted_ids.dtype == expert_ids.dtype == num_post.dtype == torch.int32
    assert int(num_post) == r_post
    np.testing.assert_array_equal(sorted_ids.numpy(), r_sorted)
    np.testing.assert_array_equal(expert_ids.numpy(), r_experts)
    assert 3 not in expert_ids.tolist()


@pytest.mark.parametrize("t", [1, 37])
@pytest.mark.parametrize("e", [8, 16])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_matches_reference(t: int, e: int, k: int, dtype: torch.dtype) -> None:
    layer = _layer(t, e, k, dtype, seed=t * e + k)
    out = K.fused_moe(**layer)
    assert out.shape == (t, H) and out.dtype == dtype
    _assert_close(out, K.reference_moe(**layer), TOL[dtype])


def test_fused_moe_bf16_upcast_in_interpreter() -> None:
    layer = _layer(37, 8, 2, torch.bfloat16, seed=5)
    _assert_close(K.fused_moe(**layer), K.reference_moe(**layer), TOL[torch.bfloat16])


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_fused_moe_experts_without_tokens(block_m: int) -> None:
    layer = _layer(37, 8, 2, torch.float32, seed=1)
    layer["ids"] = torch.stack([torch.tensor([6, 1])] * 20 + [torch.tensor([1, 6])] * 17)
    out = K.fused_moe(**layer, block_m=block_m)
    _assert_close(out, K.reference_moe(**layer), TOL[torch.float32])


def test_fused_moe_drops_out_of_range_ids_and_is_deterministic() -> None:
    layer = _layer(37, 8, 2, torch.float32, seed=2)
    layer["ids"][::3, 1] = -1
    out = K.fused_moe(**layer)
    _assert_close(out, K.reference_moe(**layer), TOL[torch.float32])
    assert torch.equal(out, K.fused_moe(**layer))


def test_routing_then_moe_end_to_end() -> None:
    layer = _layer(37, 16, 2, torch.float16, seed=3)
    logits = torch.randn(37, 16, generator=torch.Generator().manual_seed(9)).half()
    layer["weights"], layer["ids"] = K.topk_routing(logits, 2)
    _assert_close(K.fused_moe(**layer), K.reference_moe(**layer), TOL[torch.float16])


def test_fused_moe_empty_and_shape_errors() -> None:
    layer = _layer(4, 8, 2, torch.float32)
    empty = dict(layer, hidden=layer["hidden"][:0], weights=layer["weights"][:0],
                 ids=layer["ids"][:0])
    assert K.fused_moe(**empty).shape == (0, H)
    with pytest.raises(MixportError, match="down has the wrong shape"):
        K.fused_moe(**dict(layer, down=layer["down"][:, :-1]))
    with pytest.raises(MixportError, match="share a dtype"):
        K.fused_moe(**dict(layer, gate_up=layer["gate_up"].half()))
    with pytest.raises(MixportError, match="int64"):
        K.fused_moe(**dict(layer, ids=layer["ids"].int()))


def test_routing_writes_the_given_outputs() -> None:
    logits = torch.randn(37, 8, generator=torch.Generator().manual_seed(4))
    weights, ids = torch.full((37, 2), -1.0), torch.full((37, 2), -1, dtype=torch.int64)
    got = K.topk_routing(logits, 2, out=(weights, ids))
    assert got[0] is weights and got[1] is ids
    rw, rids = K.reference_routing(logits, 2)
    np.testing.assert_array_equal(ids.numpy(), rids)
    np.testing.assert_allclose(weights.numpy(), rw, rtol=2e-5, atol=2e-6)
    with pytest.raises(MixportError, match="out ids has the wrong dtype"):
        K.topk_routing(logits, 2, out=(weights, ids.int()))


@pytest.mark.parametrize("t", [37, 100])  # 74 pairs: BLOCK_M 16; 200 pairs: BLOCK_M 64
def test_fused_moe_keeps_every_intermediate_in_the_workspace(t: int) -> None:
    """What a TensorRT plugin does: scratch from the workspace it is given, result into its output."""
    layer, e, k = _layer(t, 8, 2, torch.float16, seed=4), 8, 2
    need = K.moe_scratch_bytes(t, H, F, e, k, "float16")
    workspace = torch.full((need,), 0xA5, dtype=torch.uint8)  # garbage: nothing may be read before written
    out = torch.empty(t, H, dtype=torch.float16)
    assert K.fused_moe(**layer, workspace=workspace, out=out) is out
    assert torch.equal(out, K.fused_moe(**layer))  # same bits as with its own buffer
    scratch = carve(workspace, scratch_layout(t * k, H, F, e, "float16", choose_block_m(t * k, e)))
    assert int(scratch["num_post"]) == reference_align(layer["ids"], e, choose_block_m(t * k, e))[2]
    # The reduce kernel's input sits in the workspace: its k rows per token sum to the output.
    assert torch.equal(scratch["partial"].view(t, k, H).sum(1).half(), out)
    with pytest.raises(MixportError, match="workspace is too small"):
        K.fused_moe(**layer, workspace=workspace[:-1])


def test_workspace_bound_covers_every_token_count() -> None:
    """block_m_ranges agrees with choose_block_m, so moe_workspace_bytes covers 1..max tokens."""
    for e, max_pairs in [(8, 1), (8, 128), (8, 129), (16, 700)]:
        ranges = block_m_ranges(max_pairs, e)
        assert all(p <= ranges[choose_block_m(p, e)] for p in range(1, max_pairs + 1))
        assert all(choose_block_m(p, e) == bm for bm, p in ranges.items())
    assert max(K.moe_scratch_bytes(t, H, F, 8, 2, "bfloat16") for t in range(1, 301)) == K.moe_workspace_bytes(
        300, H, F, 8, 2, "bfloat16")


V3 = {  # TopKRouting version 3: (spec kwargs, experts)
    "sigmoid_bias_top2sum": (dict(k=4, normalization="renormalize", scoring="sigmoid", bias=True, n_group=4,
                                  topk_group=2, group_score="top2_sum", scaling=2.5), 16),
    "softmax_max_groups": (dict(k=3, normalization="none", n_group=4, topk_group=2, scaling=16.0), 16),
    "sigmoid_bias": (dict(k=2, normalization="none", scoring="sigmoid", bias=True), 6),
    "sparsemixer": (dict(k=2, normalization="none", scoring="sparsemixer", eps=0.05), 7),
}


@pytest.mark.parametrize("case", V3)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_routing_v3_matches_reference(case: str, dtype: torch.dtype) -> None:
    """Sigmoid scores, the selection-only bias, grouped top-k (max / top-2 sum), the scaling factor and
    sparsemixer: the kernel picks the oracle's experts (fp16 logits: the oracle sees the same fp16 values)
    and weighs them within tolerance; the bias and the groups really change the picks."""
    kw, e = V3[case]
    g = torch.Generator().manual_seed(len(case))
    logits = (torch.randn(37, e, generator=g) * 2).to(dtype)
    bias = torch.randn(e, generator=g) * 0.3 if kw.get("bias") else None
    args = {k: v for k, v in kw.items() if k not in ("k", "normalization", "bias")}
    w, ids = K.topk_routing(logits, kw["k"], kw["normalization"], bias=bias, **args)
    rw, rids = K.reference_routing(logits, kw["k"], kw["normalization"], bias=bias, **args)
    np.testing.assert_array_equal(ids.numpy(), rids)
    _assert_close(w, rw, TOL[dtype] * 4)
    if bias is not None or kw.get("n_group", 1) > 1:
        plain = np.argsort(-logits.float().numpy(), axis=1, kind="stable")[:, :kw["k"]]
        assert (np.sort(rids, 1) != np.sort(plain, 1)).any(axis=1).sum() > 3


def test_routing_v3_refuses_an_inconsistent_spec() -> None:
    logits = torch.randn(4, 8)
    with pytest.raises(MixportError, match="sparsemixer routes top-2"):
        K.topk_routing(logits, 3, "none", scoring="sparsemixer")
    with pytest.raises(MixportError, match="must divide"):
        K.topk_routing(logits, 2, "none", n_group=3)
