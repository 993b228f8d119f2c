"""Where a session's memory goes while it loads (issue 15): load FOLDER as `mixport run` does and print
VmRSS / RssAnon / RssFile (MiB) at each stage: after imports, after QMoE's inputs are mapped (fast graph),
after ONNX Runtime's session is created, after load, after malloc_trim, after generating --tokens.

    PYTHONPATH=. python tools/real_size_probe.py FOLDER [--threads 2] [--graph auto]
        [--config KEY=VALUE ...] [--no-arena] [--tokens 8]

--config adds ONNX Runtime session config entries (e.g. session.disable_prepacking=1) and --no-arena
turns the CPU arena off, to test one suspect at a time. Run it inside a memory limit on shared machines
(tools/bench_real_size.py --run-limit makes a cgroup; here: `systemd-run --scope -p MemoryMax=...` or
the bench's own child).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: the real-size bench's modules
from real_size_child import status  # noqa: E402

MIB = 1 << 20


def show(stage: str, t0: float) -> None:
    m = status()  # the bench's own reader of /proc/self/status
    print(f"{stage:<28} {time.perf_counter() - t0:7.1f} s  RSS {m['VmRSS'] / MIB:8.0f}  anon {m['RssAnon'] / MIB:8.0f}"
          f"  file {m['RssFile'] / MIB:7.0f}  HWM {m['VmHWM'] / MIB:8.0f}", flush=True)


def patch(args: argparse.Namespace, t0: float) -> None:
    """Print memory around the fast session's stages; add --config entries and --no-arena to every session."""
    from mixport.runtime import ort_fast, ort_qmoe, ort_session

    mapped = ort_qmoe.mapped_parts

    def mapped_parts(*a: Any, **k: Any) -> Any:
        got = mapped(*a, **k)
        show(f"QMoE inputs mapped ({sum(v.nbytes for v in got.values()) / MIB:.0f} MiB)", t0)
        return got

    ort_fast.ort_qmoe.mapped_parts = mapped_parts  # type: ignore[attr-defined]
    options = ort_session.session_options
    extra = dict(kv.split("=", 1) for kv in args.config)

    def session_options(threads: Any, config: Any = None) -> Any:
        opts = options(threads, {**(config or {}), **extra})
        if args.no_arena:
            opts.enable_cpu_mem_arena = False
        return opts

    ort_session.session_options = session_options
    opened = ort_session.open_session

    def open_session(*a: Any, **k: Any) -> Any:
        sess = opened(*a, **k)
        show("ORT session created", t0)
        return sess

    ort_fast.open_session = open_session  # type: ignore[attr-defined]
    ort_session.open_session = open_session


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--graph", default="auto")
    ap.add_argument("--config", action="append", default=[], help="KEY=VALUE session config entry")
    ap.add_argument("--no-arena", action="store_true")
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args(argv)
    import numpy as np  # noqa: F401 - imported before the baseline, as the bench's run does
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401

    from mixport.runtime import load
    from mixport.runtime.generate import GenerationRequest, iter_generate

    t0 = time.perf_counter()
    show("imports (base)", t0)
    patch(args, t0)
    pipe = load(args.folder, threads=args.threads, graph=args.graph)
    show(f"loaded ({pipe.graph})", t0)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    show("after malloc_trim", t0)
    req = GenerationRequest([pipe.encode("The ship sailed into the harbour")], args.tokens, eos_ids=(),
                            vocab_size=pipe.vocab_size)
    t1 = time.perf_counter()
    tokens = [tok for _row, tok in iter_generate(pipe.session, req, pipe.context)]
    show(f"generated {len(tokens)} ({len(tokens) / (time.perf_counter() - t1):.2f} tok/s)", t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
