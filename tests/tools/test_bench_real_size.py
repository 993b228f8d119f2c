"""tools/bench_real_size.py (issue 15): its measurement (a cgroup's peak, an OOM kill at a limit), the
checkpoint it writes, the whole run on tiny dimensions, and the `--layers 1` smoke run at Mixtral-8x7B's
real dimensions (slow: ~3.4 GB checkpoint, set MIXPORT_REAL_SIZE_WORK to a folder to keep and reuse it,
MIXPORT_REAL_SIZE_LOCK to an flock file shared with other big jobs)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import real_size_ckpt as ckpt  # noqa: E402
import real_size_families as families  # noqa: E402
from bench_real_size import size  # noqa: E402
from real_size_measure import run_child  # noqa: E402

MB = 1 << 20


def test_size_words() -> None:
    assert size("2G") == 2 << 30 and size("512M") == 512 << 20 and size("1.5G") == 3 << 29
    assert size("none") is None and size("0") is None and size("4096") == 4096
    with pytest.raises(Exception, match="a size like"):
        size("2 gigs")


def test_child_peak_and_oom_at_a_limit(tmp_path: Path) -> None:
    """A child holding 300 MB: its peak is seen (cgroup and VmHWM); under a 100 MB limit it is reported
    as OOM, not as a crash. Without a cgroup the measure says so and no limit applies."""
    m = run_child("hog", {"mb": 300, "seconds": 0.5}, tmp_path / "free.log", "test-hog", None, tmp_path)
    assert m.status == "ok" and m.result["mb"] == 300
    assert 300 * MB <= m.vmhwm_bytes < 600 * MB and m.ru_maxrss_bytes >= m.vmhwm_bytes
    assert m.wall_s >= 0.5
    limited = run_child("hog", {"mb": 300}, tmp_path / "limited.log", "test-hog-limit", 100 * MB, tmp_path)
    if m.measure.startswith("cgroup"):
        assert 300 * MB <= m.cgroup_peak_bytes < 600 * MB and m.peak_bytes == m.cgroup_peak_bytes
        assert limited.status == "OOM" and limited.rc == -9 and limited.limit_bytes == 100 * MB
        assert limited.cgroup_peak_bytes <= 100 * MB and not limited.result
    else:
        assert m.measure.startswith("VmHWM only (") and m.peak_bytes == m.vmhwm_bytes
        assert limited.status == "ok" and limited.limit_bytes is None


def test_bf16_table_is_a_normal_law() -> None:
    table = ckpt.bf16_table(0.0, 0.5)
    values = (table.astype(np.uint32) << 16).view(np.float32)
    assert table.dtype == np.uint16 and len(table) == 65536 and np.all(np.diff(values) >= 0)
    assert abs(values.mean()) < 1e-3 and abs(values.std() - 0.5) < 5e-3
    assert np.mean(np.abs(values) < 0.5) == pytest.approx(0.6827, abs=2e-3)  # one sigma


def test_tiny_checkpoint_loads_as_the_hub_layout(tmp_path: Path) -> None:
    """One shard per layer + one for the rest, the index names every tensor, mixport's loader reads it
    at the config's shapes; the same seed gives the same bytes, another seed others."""
    from safetensors.numpy import load_file

    from mixport.exporter.loader import expected_shapes

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    got = ckpt.write(a, 2, seed=0, tiny=True, progress=lambda _m: None)
    ckpt.write(b, 2, seed=0, tiny=True, progress=lambda _m: None)
    ckpt.write(c, 2, seed=1, tiny=True, progress=lambda _m: None)
    assert got["shards"] == 3 and ckpt.is_complete(a, 2, 0, tiny=True) and not ckpt.is_complete(a, 2, 1, tiny=True)
    index = json.loads((a / "model.safetensors.index.json").read_text())["weight_map"]
    shapes = expected_shapes(ckpt.config(2, tiny=True))
    assert len(index) == len(shapes)
    for i in range(2):
        assert {f for n, f in index.items() if f".layers.{i}." in n} == {f"model-0000{i + 1}-of-00003.safetensors"}
    total = 0
    for shard in sorted(set(index.values())):
        tensors = load_file(str(a / shard))  # bf16 reads back as ml_dtypes' bfloat16
        total += sum(t.size for t in tensors.values())
        assert (a / shard).read_bytes() == (b / shard).read_bytes() != (c / shard).read_bytes()
    assert total == sum(math.prod(s) for s in shapes.values())
    router = load_file(str(a / index["model.layers.0.block_sparse_moe.gate.weight"]))[
        "model.layers.0.block_sparse_moe.gate.weight"].astype(np.float32)
    assert 0.8 < router.std() < 1.2  # routers drawn N(0, 1), as mixport.exporter.tiny's


def bench(args: list[str], timeout: float) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_real_size.py"), *args], capture_output=True,
                         text=True, timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    data_file = Path(args[args.index("--json") + 1])
    assert data_file.is_file(), res.stdout[-3000:] + res.stderr[-3000:]
    return res, json.loads(data_file.read_text())


def check_run(row: dict[str, Any], new_tokens: int, weights: float | None = None) -> dict[str, Any]:
    """A run row generated NEW_TOKENS tokens and its numbers hold together."""
    n = row["run"]
    assert row["state"] == "ok" and n["tokens"] == new_tokens and n["tokens_ok"]
    assert n["ran"] in ("fast", "portable") and n["backend"] == "onnxruntime"
    assert n["load_s"] > 0 and n["decode_tok_s"] > 0 and n["prefill_ms"] > 0
    assert 0 < n["base_mb"] < n["rss_mb"] <= n["hwm_mb"] and n["gen_rss_mb"] <= n["hwm_mb"] + 1
    assert n["anon_mb"] + n["file_mb"] == pytest.approx(n["rss_mb"], rel=0.05)
    assert n["rss_per_weight"] == pytest.approx(n["rss_mb"] / n["weights_mb"])
    assert n["net_per_weight"] == pytest.approx((n["rss_mb"] - n["base_mb"]) / n["weights_mb"])
    if weights is not None:
        assert n["weights_mb"] * MB == pytest.approx(weights, rel=0.02)
    return n


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path: Path) -> None:
    """--tiny: checkpoint, fp16 export under the limit, fast graph, both runs, engine build; the
    report's rows and the JSON agree; a second run reuses the checkpoint."""
    out = tmp_path / "r.json"
    res, data = bench(["--tiny", "--layers", "1", "--formats", "fp16", "--work", str(tmp_path), "--json", str(out)],
                      600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["step"]: r for r in data["rows"]}
    assert list(rows) == ["checkpoint", "export fp16", "fast graph fp16", "run fp16 auto", "run fp16 portable",
                          "build fp16"]
    assert all(r["state"] == "ok" for r in rows.values())
    export = rows["export fp16"]["m"]
    assert export["limit_bytes"] == 2 << 30 and export["wall_s"] > 0 and export["vmhwm_bytes"] > 100 * MB
    auto = check_run(rows["run fp16 auto"], 8)
    portable = check_run(rows["run fp16 portable"], 8)
    assert auto["ran"] == "fast" and portable["ran"] == "portable" and "model.ort.onnx" in auto["weights_files"]
    assert "2 plugin layers" in rows["build fp16"]["notes"] and rows["build fp16"]["out_bytes"] > 0
    for step in rows:
        assert any(line.startswith(step) for line in res.stdout.splitlines()), step
    assert not list(tmp_path.glob("export-*"))  # deleted after its steps (no --keep)
    res, data = bench(["--tiny", "--layers", "1", "--formats", "int4", "--graphs", "portable", "--skip-build",
                       "--work", str(tmp_path), "--json", str(out)], 600)
    rows = {r["step"]: r for r in data["rows"]}
    assert res.returncode == 0 and rows["checkpoint"]["state"] == "reused"
    check_run(rows["run int4 portable"], 8)


def fp16_weights(layers: int) -> int:
    """Bytes of an fp16 export of the real-size checkpoint (every parameter, 2 bytes)."""
    from mixport.exporter.loader import expected_shapes

    return sum(math.prod(s) for s in expected_shapes(ckpt.config(layers)).values()) * 2


@pytest.mark.slow
def test_real_size_one_layer_smoke(tmp_path: Path) -> None:
    """`--layers 1` at Mixtral-8x7B's real dimensions, int4 experts over fp16: the export ran inside the
    issue's 2 GiB limit, and `mixport run`'s default path generated 8 tokens holding at most 1.15x the
    weights it uses above the process's fixed size (the issue's targets, measured; ~2-3 min)."""
    work = Path(os.environ.get("MIXPORT_REAL_SIZE_WORK", tmp_path))
    lock = os.environ.get("MIXPORT_REAL_SIZE_LOCK")
    out = tmp_path / "r.json"
    args = ["--layers", "1", "--formats", "int4-fp16", "--graphs", "auto", "--skip-build", "--no-retry",
            "--work", str(work), "--json", str(out)]
    res, data = bench(args + (["--lock", lock] if lock else []), 3600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = {r["step"]: r for r in data["rows"]}
    fp16 = fp16_weights(1)
    assert rows["checkpoint"]["state"] in ("ok", "reused") and rows["checkpoint"]["out_bytes"] > fp16
    export = rows["export int4-fp16"]
    assert export["state"] == "ok" and export["m"]["limit_bytes"] == 2 << 30, export  # inside 2 GiB
    assert 0.25 * fp16 < export["out_bytes"] < 0.4 * fp16  # int4 experts and attention, fp16 embeddings
    assert export["m"]["vmhwm_bytes"] > 0 and export["m"]["wall_s"] > 0 and export["m"]["disk_peak_bytes"] > 0
    assert rows["fast graph int4-fp16"]["state"] == "ok"
    run = check_run(rows["run int4-fp16 auto"], 8)
    # the export's bytes, but QMoE's scales fp32 (in model.ort.onnx.qmoe) where the export holds them fp16: +7%
    assert run["ran"] == "fast" and run["weights_mb"] * MB == pytest.approx(1.07 * export["out_bytes"], rel=0.04)
    # fp16 embeddings / lm_head are converted to fp32 by the CPU provider: they count twice in "held"
    assert run["held_mb"] > run["weights_mb"] * 1.3 and run["net_per_weight"] > run["net_per_held"], run
    assert 0.5 < run["net_per_held"] <= 1.15, run  # resident, not merely mapped; no second copy
    assert not list(work.glob("export-*")) and not list(work.glob(".export-*"))  # deleted after their steps


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v2"])
def test_tiny_family_end_to_end(family: str, tmp_path: Path) -> None:
    """--tiny --family: the family's hub layout (GPT-OSS: MXFP4 expert blocks / scales, bf16 biases and
    sinks; DeepSeek-V2-Lite: a dense first layer, per-expert tensors, MLA) written, read back by mixport's
    config reader as that family, exported under the 2 GiB limit and run (export + run, seconds)."""
    from safetensors import safe_open

    from mixport.exporter.config import load_config

    out = tmp_path / "r.json"
    res, data = bench(["--tiny", "--family", family, "--layers", "2", "--formats", "fp16", "--graphs", "portable",
                       "--skip-build", "--work", str(tmp_path), "--json", str(out)], 300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = {r["step"]: r for r in data["rows"]}
    assert list(rows) == ["checkpoint", "export fp16", "run fp16 portable"]
    assert rows["export fp16"]["state"] == "ok" and rows["export fp16"]["m"]["limit_bytes"] == 2 << 30
    check_run(rows["run fp16 portable"], 8)
    folder = tmp_path / ckpt.folder_name(2, 0, tiny=True, family=family)
    assert ckpt.is_complete(folder, 2, 0, tiny=True, family=family)  # a later run reuses it
    assert json.loads((folder / "config.json").read_text()) == families.hf_config(family, 2, tiny=True)
    cfg = load_config(folder)[0]
    assert cfg.model_type == family and cfg.num_hidden_layers == 2
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    dtypes = {}
    for name, shard in index.items():
        with safe_open(str(folder / shard), framework="np") as fh:
            dtypes[name] = str(fh.get_slice(name).get_dtype())
    if family == "gpt_oss":
        blocks = "model.layers.1.mlp.experts.down_proj_blocks"
        assert dtypes[blocks] == "U8" and dtypes[blocks.replace("_blocks", "_scales")] == "U8"
        assert dtypes["model.layers.1.mlp.experts.down_proj_bias"] == "BF16"
        assert "model.layers.1.mlp.experts.down_proj" not in index and cfg.sliding_layers == (0,)
    else:
        assert "model.layers.0.mlp.gate_proj.weight" in index and "model.layers.0.mlp.gate.weight" not in index
        assert "model.layers.1.mlp.experts.7.down_proj.weight" in index and cfg.kv_lora_rank == 32
    assert "U8" in dtypes.values() if family == "gpt_oss" else set(dtypes.values()) == {"BF16"}
