"""What a session's weights take in memory, and whether this machine has it.

ONNX Runtime's CPU provider has no fp16 matrix kernels on x86: a session over fp16 weights inserts
casts, and constant folding turns every fp16 weight into an fp32 copy when the session starts (the
fp16 bytes are then dropped). On the CPU an fp16 export therefore runs in fp32 and holds twice its
file size (tools/bench_real_size.py: 1-layer Mixtral-8x7B fp16, 3.2 GB of weights, resident 6.1 GB
after load). ``require`` refuses, with one line and before anything is loaded, a load whose weights
would not fit in the memory available.
"""

from __future__ import annotations

from pathlib import Path

from mixport.errors import RuntimeFailure

GB = 1 << 30


def available_memory() -> int | None:
    """Bytes this process may still use: MemAvailable from /proc/meminfo, or less when its memory
    cgroup's limit leaves less (v2 ``memory.max``, v1 ``memory.limit_in_bytes``; the cgroup's page
    cache counts as free, as the kernel reclaims it first). None where neither is known."""
    free = _meminfo()
    room = _cgroup_room()
    if free is None or room is None:
        return free if room is None else room
    return min(free, room)


def _meminfo() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """limit - (usage - page cache) of this process's memory cgroup, or None (no limit, not Linux)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            found = _room(root / path.lstrip("/"), "memory.max", "memory.current", "file")
        elif "memory" in controllers.split(","):  # v1
            found = _room(root / "memory" / path.lstrip("/"), "memory.limit_in_bytes", "memory.usage_in_bytes",
                          "total_cache")
        else:
            continue
        if found is not None:
            return found
    return None


def _room(folder: Path, limit_file: str, usage_file: str, cache_key: str) -> int | None:
    try:
        raw = (folder / limit_file).read_text().strip()
        if raw == "max" or int(raw) >= 1 << 60:  # unlimited
            return None
        usage = int((folder / usage_file).read_text())
        stat = dict(ln.split() for ln in (folder / "memory.stat").read_text().splitlines() if ln.count(" ") == 1)
        return max(0, int(raw) - (usage - int(stat.get(cache_key, 0))))
    except (OSError, ValueError):
        return None


def weight_bytes(model_path: Path) -> int:
    """The bytes of model.onnx and its model.onnx.data (the export's weights, give or take the graph)."""
    files = [Path(model_path), Path(model_path).with_name(Path(model_path).name + ".data")]
    return sum(f.stat().st_size for f in files if f.is_file())


def resident_bytes(model_path: Path, dtype: str, device: str, dequantized: bool = False) -> int:
    """What the weights of ``model_path`` take once ONNX Runtime has loaded them on ``device``;
    ``dequantized``: its quantized weights are folded to fp32 at load (the portable session of a
    quantized folder), which peaks at ``FOLD_PEAK`` times their fp32 bytes."""
    size = weight_bytes(model_path)
    if dequantized:
        return int(FOLD_PEAK * _dequantized_bytes(model_path))
    return 2 * size if dtype == "fp16" and device == "cpu" else size


# the portable session of a quantized folder: ONNX Runtime's constant folding of the per-expert
# DequantizeLinear peaks at ~1.7x the fp32 weights it leaves (1-layer Mixtral-8x7B int4: 6.1 GB after
# load, 10.4 GB VmHWM; tools/bench_real_size.py)
FOLD_PEAK = 1.7


def _dequantized_bytes(model_path: Path) -> int:
    """The bytes of ``model_path``'s weights with every int8 / int4 tensor as fp32."""
    from onnx import TensorProto, helper

    from mixport.runtime import onnx_locate

    total = 0
    for t in onnx_locate.skeleton(Path(model_path)).graph.initializer:
        count = 1
        for d in t.dims:
            count *= d
        quantized = t.data_type in (TensorProto.INT8, TensorProto.INT4, TensorProto.UINT4)
        total += count * (4 if quantized else helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)
    return total


def require(model_path: Path, dtype: str, device: str, dequantized: bool = False) -> None:
    """Refuse a load whose weights would not fit in the memory available (unknown: allowed)."""
    need, free = resident_bytes(model_path, dtype, device, dequantized), available_memory()
    if free is None or need <= free:
        return
    why = " (ONNX Runtime's CPU provider computes fp16 weights in fp32: twice the file)" \
        if dtype == "fp16" and device == "cpu" else ""
    if dequantized:
        why = " (the portable graph dequantizes the quantized weights to fp32 when it loads)"
    raise RuntimeFailure(f"the weights do not fit in the memory available{why}",
                         given=f"{Path(model_path).parent}: {need / GB:.1f} GB to load, {free / GB:.1f} GB available",
                         expected="weights that fit in memory",
                         hint="run the default graph (not --graph portable): it keeps them quantized" if dequantized
                         else "export with --quantize int8 / int4 (or fp32, which loads at its file size) for CPU, "
                              "or run fp16 on a GPU" if dtype == "fp16" else
                         "export with --quantize int8 / int4, or use a machine with more memory")


def give_back() -> None:
    """Hand glibc's free heap pages back to the system (``malloc_trim``) after a load's temporaries
    (measured, 2 real Mixtral-8x7B layers int4: 93 MiB, 3% of the weights); nothing without glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
