"""One measured step of tools/bench_real_size.py, run as its own process:

    python tools/real_size_child.py STEP SPEC_JSON RESULT_JSON

STEP: ``hog`` (hold some memory: the measurement's own check), ``ckpt`` (write the checkpoint),
``cli`` (a ``mixport`` command, in this process: export, build),
``fastgraph`` (build model.ort.onnx as `mixport run` does on first use), ``run`` (load as `mixport run`,
generate, time decode). RESULT_JSON gets the step's numbers and this process's memory at its end
(``status``: /proc/self/status in bytes), written before anything else could add to it.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = "The ship sailed into the harbour"
STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def status() -> dict[str, int]:
    """This process's memory now (VmRSS, VmHWM: its peak, RssAnon / RssFile / RssShmem), bytes."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in STATUS_KEYS:
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def ckpt(spec: dict[str, Any]) -> dict[str, Any]:
    import real_size_ckpt

    t = time.perf_counter()
    got = real_size_ckpt.write(Path(spec["folder"]), spec["layers"], spec["seed"], spec.get("tiny", False),
                               progress=lambda msg: print(msg, flush=True), family=spec.get("family", "mixtral"))
    return {**got, "seconds": time.perf_counter() - t}


def cli(spec: dict[str, Any]) -> dict[str, Any]:
    """A mixport command as `mixport ARGV...` runs it; its exit code (errors print as the CLI prints them)."""
    from mixport.cli import main

    t = time.perf_counter()
    try:
        main.main(args=spec["argv"], prog_name="mixport")
        rc = 0
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return {"rc": rc, "seconds": time.perf_counter() - t}


def fastgraph(spec: dict[str, Any]) -> dict[str, Any]:
    from mixport.artifact import Manifest
    from mixport.runtime import ort_graph

    folder = Path(spec["folder"])
    t = time.perf_counter()
    path = ort_graph.ensure(folder, Manifest.read(folder), progress=lambda msg: print(msg, flush=True))
    seconds = time.perf_counter() - t
    files = [p for p in folder.iterdir() if p.name.startswith(path.name)]
    return {"seconds": seconds, "bytes": sum(p.stat().st_size for p in files), "files": sorted(p.name for p in files)}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Load as `mixport run` does (graph auto | portable), generate ``new_tokens`` greedy tokens, time
    ``bench_tokens`` more (mixport bench's loop); memory before load, after load, after generating."""
    import numpy as np  # noqa: F401 - everything a session needs, imported before the baseline
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import tokenizers  # noqa: F401

    from mixport.runtime import load, ort_fast, ort_graph, ort_qmoe, ort_session  # noqa: F401
    from mixport.runtime.generate import GenerationRequest, iter_generate
    from mixport.tools.bench import bench_session

    folder = Path(spec["folder"])
    out: dict[str, Any] = {"base": status()}
    t = time.perf_counter()
    pipe = load(folder, threads=spec.get("threads"), graph=spec["graph"], progress=lambda m: print(m, flush=True))
    out["load_s"], out["loaded"], out["graph"], out["backend"] = time.perf_counter() - t, status(), pipe.graph, \
        pipe.backend
    prompt = pipe.encode(PROMPT)
    t = time.perf_counter()
    req = GenerationRequest([prompt], spec["new_tokens"], eos_ids=(), vocab_size=pipe.vocab_size)
    out["tokens"] = [tok for _row, tok in iter_generate(pipe.session, req, pipe.context)]
    out["generate_s"], out["generated"] = time.perf_counter() - t, status()
    row = bench_session(pipe.session, pipe.vocab_size, pipe.context, len(prompt), spec["bench_tokens"], batch=1, runs=1)
    out["prompt_len"], out["prefill_ms"], out["decode_tok_s"] = len(prompt), row.prefill_ms, row.decode_tok_s
    out["status"] = status()
    path = folder / (ort_graph.FILE if pipe.graph == "fast" else "model.onnx")
    pipe.close()
    out["weights"] = graph_weights(path)
    return out


def graph_weights(model: Path) -> dict[str, Any]:
    """The bytes of the initializers of MODEL (the graph a session loads): inline raw data, external
    data (each (file, offset, length) once: the fast graph's views of one stacked tensor are not counted
    twice; its QMoE inputs are in its own file, ``ort_qmoe.PARTS``). Reads
    only records' headers of an inline file (a memory map), like ``runtime.onnx_locate``."""
    import mmap

    from onnx import TensorProto, external_data_helper, numpy_helper

    from mixport.folder_check import wire_fields

    inline, fp16, external, files = 0, 0, set(), {model.name}
    with model.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        graphs = [(a, b) for field, a, b in wire_fields(buf, 0, len(buf)) if field == 7]  # ModelProto.graph
        for g0, g1 in graphs:
            for field, t0, t1 in wire_fields(buf, g0, g1):
                if field != 5:  # GraphProto.initializer
                    continue
                raw = [b - a for fld, a, b in wire_fields(buf, t0, t1) if fld == 9]  # TensorProto.raw_data
                if raw:
                    inline += raw[0]
                    fp16 += raw[0] if _data_type(buf, t0, t1) == TensorProto.FLOAT16 else 0
                    continue
                tensor = TensorProto.FromString(buf[t0:t1])
                if not external_data_helper.uses_external_data(tensor):
                    size = numpy_helper.to_array(tensor).nbytes
                    inline += size
                    fp16 += size if tensor.data_type == TensorProto.FLOAT16 else 0
                    continue
                info = {e.key: e.value for e in tensor.external_data}
                length = int(info["length"]) if "length" in info else _nbytes(tensor)
                files.add(info["location"])
                key = (info["location"], int(info.get("offset", 0)), length)
                fp16 += length if tensor.data_type == TensorProto.FLOAT16 and key not in external else 0
                external.add(key)
    ext = sum(length for _, _, length in external)
    return {"bytes": inline + ext, "inline": inline, "external": ext, "fp16": fp16,
            "files": sorted(files), "file_bytes": sum((model.parent / f).stat().st_size for f in files)}


def _data_type(buf: Any, pos: int, end: int) -> int:
    """TensorProto.data_type (field 2, a varint) of the record in buf[pos:end], without reading its data."""
    from mixport.folder_check import _varint

    while pos < end:
        key, pos = _varint(buf, pos, end)
        kind = key & 7
        if kind == 0:
            value, pos = _varint(buf, pos, end)
            if key >> 3 == 2:
                return value
        elif kind in (1, 5):
            pos += 8 if kind == 1 else 4
        else:
            size, pos = _varint(buf, pos, end)
            pos += size
    return 0


def _nbytes(tensor: Any) -> int:
    """Bytes of an external tensor without a recorded length (4-bit types pack two values a byte)."""
    from onnx import TensorProto, helper

    count = math.prod(tensor.dims)
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (count + 1) // 2
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def hog(spec: dict[str, Any]) -> dict[str, Any]:
    """Touch ``mb`` MB of anonymous memory and hold it ``seconds`` (checks the measurement itself:
    the peak seen, and an OOM kill under a lower limit)."""
    block = bytearray(spec["mb"] << 20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(spec.get("seconds", 0.5))
    return {"mb": len(block) >> 20}


STEPS = {"hog": hog, "ckpt": ckpt, "cli": cli, "fastgraph": fastgraph, "run": run}


def main() -> int:
    step, spec, result = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    got = STEPS[step](spec)
    got.setdefault("status", status())
    result.write_text(json.dumps(got))
    return int(got.get("rc", 0))


if __name__ == "__main__":
    sys.exit(main())
