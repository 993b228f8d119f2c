"""LazyWeight.read converts a weight a chunk of rows at a time into its result (the stored tensor is
never held beside it): the same values as reading it whole, every index form the adapters use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mixport.errors import CheckpointError
from mixport.exporter import checkpoint
from mixport.exporter.checkpoint import LazyWeight

E, F, H = 3, 10, 6


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_file({"stacked": torch.randn(E, 2 * F, H, generator=g).to(torch.bfloat16),  # transformers-5 experts
               "plain": torch.randn(2 * F, H, generator=g).to(torch.bfloat16),
               "norm": torch.randn(H, generator=g).to(torch.bfloat16)}, str(path))
    return path


CASES = [("stacked", (1, slice(0, F)), (F, H)), ("stacked", (2, slice(F, 2 * F)), (F, H)),
         ("stacked", (1,), (2 * F, H)), ("plain", (slice(F, 2 * F),), (F, H)), ("plain", (), (2 * F, H)),
         ("norm", (), (H,))]


@pytest.mark.parametrize("name,index,shape", CASES, ids=[f"{n}{i}" for n, i, _ in CASES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_chunked_read_equals_whole_read(name: str, index: tuple, shape: tuple, dtype: torch.dtype, shard: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as fh:
        stored = fh.get_tensor(name)
    want = (stored[index] if index else stored).to(dtype)
    monkeypatch.setattr(checkpoint, "READ_CHUNK", 2 * H + 1)  # 2 rows at a time: several chunks, a short last one
    got = LazyWeight(torch.Size(shape), shard, name, index, dtype).read()
    assert got.dtype == dtype and got.shape == want.shape and torch.equal(got, want)


def test_non_finite_values_counted_across_chunks(shard: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    state = load_file(str(shard))
    state["plain"][1, 2] = float("nan")
    state["plain"][17, 0] = float("inf")  # in another chunk
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    monkeypatch.setattr(checkpoint, "READ_CHUNK", 4 * H)
    with pytest.raises(CheckpointError, match=r"plain.*2 of 120 values not finite"):
        LazyWeight(torch.Size((2 * F, H)), bad, "plain", (), torch.float16).read()
