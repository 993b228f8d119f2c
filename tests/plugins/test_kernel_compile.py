"""Ahead-of-time builds: Triton kernels -> sm_80 / sm_90 PTX + cubin, and the CMake library.

Nothing here runs CUDA code (no GPU); the tests check that the artifacts are
produced, target the right architectures and expose the documented entries.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import require_module

ROOT = Path(__file__).resolve().parents[2]
KERNELS = {"topk_routing_kernel", "moe_align_kernel", "gate_up_kernel", "down_kernel",
           "reduce_kernel", "qgate_up_kernel", "qdown_kernel", "biased_gate_up_kernel", "biased_down_kernel"}
C_SYMBOLS = {"mixport_topk_routing", "mixport_topk_routing_ordered", "mixport_moe_align_sizes", "mixport_moe_align",
             "mixport_module_load", "mixport_module_unload", "mixport_launch"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    require_module("triton")
    from mixport.plugins.kernels.compile import compile_all

    out = tmp_path_factory.mktemp("ptx")
    return out, compile_all(out, archs=(80, 90))


@pytest.mark.slow
def test_compile_all_writes_ptx_for_sm80_and_sm90(compiled: tuple[Path, list[Path]]) -> None:
    out, files = compiled
    manifest = json.loads((out / "manifest.json").read_text())
    entries = manifest["kernels"]
    assert {e["kernel"] for e in entries} == KERNELS
    assert {e["arch"] for e in entries} == {"sm_80", "sm_90"}
    assert {e["dtype"] for e in entries if e["kernel"] == "gate_up_kernel"} == {
        "float16", "bfloat16", "float32"}
    routing_modes = {(e["arch"], e["dtype"], e["constexprs"]["TOPK_FIRST"], e["constexprs"]["RENORMALIZE"])
                     for e in entries if e["kernel"] == "topk_routing_kernel"}
    assert len(routing_modes) == 2 * 3 * 2 * 2  # both orders x both normalizations, every dtype and arch
    quantized = {(e["kernel"], e["arch"], e["dtype"], e["constexprs"]["BITS"], e["constexprs"]["HAS_ZERO"],
                  e["constexprs"]["QBLOCK"], e["constexprs"]["BLOCK_M"])
                 for e in entries if e["kernel"].startswith("q")}
    assert len(quantized) == 2 * 2 * 3 * 3 * 2  # 2 kernels, 2 archs, 3 dtypes, int8/int4/int4-zp, 2 BLOCK_M
    assert {q[5] for q in quantized} == {32}  # the default quantization block
    clamped = {(e["arch"], e["dtype"], e["constexprs"]["CLAMPED"], e["constexprs"]["BLOCK_M"])
               for e in entries if e["kernel"] == "biased_gate_up_kernel"}
    assert len(clamped) == 2 * 3 * 2 * 2  # clamped and plain SwiGLU, every arch, dtype and BLOCK_M
    for e in entries:
        ptx = (out / e["files"]["ptx"]).read_text()
        target = re.search(r"^\.target (sm_\d+)", ptx, re.M)
        assert target and target.group(1).startswith(e["arch"]), e["files"]["ptx"]
        assert f".visible .entry {e['entry']}(" in ptx
        assert e["num_ptx_params"] == len(e["params"]), e["kernel"]
        assert e["threads_per_block"] == 32 * e["num_warps"]
        assert len(e["grid"]) == 3
    assert all(path.exists() for path in files)
    assert sum(path.suffix == ".ptx" for path in files) == len(entries)


@pytest.mark.slow
def test_gemm_shared_memory_fits_sm80(compiled: tuple[Path, list[Path]]) -> None:
    out, _ = compiled
    entries = json.loads((out / "manifest.json").read_text())["kernels"]
    for e in entries:
        assert e["shared_mem_bytes"] <= 163 * 1024, (e["kernel"], e["variant"])


@pytest.mark.slow
@pytest.mark.parametrize("block_size", [64, 128])
def test_quantized_gemms_compile_for_every_block_size(block_size: int) -> None:
    """BLOCK_K is cut to the quantization block: each block size is its own specialization."""
    require_module("triton")
    from mixport.plugins.kernels._runtime import interpret_mode
    from mixport.plugins.kernels.compile import QUANT_SCHEMES, _compile_one, _quant_gemms

    assert not interpret_mode()  # conftest keeps this process compiled (interpreted tests run in a child)
    for scheme in QUANT_SCHEMES:
        for v in _quant_gemms("float16", 2, 16, scheme, block_size):
            assert v.constexprs["BLOCK_K"] <= block_size
            for arch in (80, 90):
                compiled = _compile_one(v, arch)
                assert f".target sm_{arch}" in compiled.asm["ptx"] and compiled.asm["cubin"]
                assert compiled.metadata.shared <= 163 * 1024


def test_cli_rejects_missing_out_dir() -> None:
    from mixport.plugins.kernels.compile import main

    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")
@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is not installed")
def test_cmake_builds_library_with_c_abi(tmp_path: Path) -> None:
    build = tmp_path / "build"
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_CUDA_ARCHITECTURES=80;90"],
                ["cmake", "--build", str(build), "-j2"]):
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lib = build / "libmixport_kernels.so"
    assert lib.exists()
    nm = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True,
                        check=True).stdout
    exported = {line.split()[-1] for line in nm.splitlines() if " T " in line}
    assert C_SYMBOLS <= exported, C_SYMBOLS - exported
