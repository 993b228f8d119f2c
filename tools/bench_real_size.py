"""Real size (issue 15): export, load and run Mixtral-8x7B-shaped layers, measuring memory, time and disk.

One run, one report:

1. checkpoint: Mixtral-8x7B's exact dimensions (hidden 4096, intermediate 14336, 32 / 8 heads, head_dim
   128, 8 experts top-2, vocab 32000), --layers N instead of 32, seeded bf16, one safetensors shard per
   layer + one for embed / norm / lm_head, as on the hub (tools/real_size_ckpt.py; ~2.9 GB a layer,
   +0.5 GB). Reused from --work when it holds one of the same layers / seed; --checkpoint uses a given one.
2. export, per --formats: `mixport export CKPT -o OUT --no-check` with --dtype fp32|fp16, or --quantize
   int8|int4 (the export's default dtype, fp32, for what stays float: embedding, norms, routers, lm_head,
   scales; int8-fp16 / int4-fp16 add --dtype fp16; int4-b64-fp16 / int4-b128-fp16: blocks of 64 /
   128 weights). --no-check skips the export-time parity check, which would run a PyTorch reference
   of the whole model. Under --export-limit (default 2G: issue 15's target);
   an export that limit kills is an "OOM" row, and is exported again under --retry-limit (default: none)
   so that the steps below still run (--no-retry: they are skipped).
3. fast graph: model.ort.onnx built as `mixport run` builds it on first use (its own step, so the runs
   below measure loading, not building).
4. run, per --graphs: `mixport.runtime.load(OUT, graph=auto|portable)` in a fresh process (auto is what
   `mixport run` does; the table says which graph ran), --new-tokens greedy tokens, then --bench-tokens
   timed (mixport bench's loop): load time, RSS before load (the fixed overhead: everything imported),
   after load (anon / file-backed) and after generating, peak, and the bytes of weights the session uses.
5. build (not with --skip-build), per --build-formats: `mixport build OUT` (TensorRT-RTX builds without a
   GPU): time, peak memory, engine size, plugin layers.

--family gpt_oss | deepseek_v2: the same steps on GPT-OSS-20B's or DeepSeek-V2-Lite's real layers (the
released config.json at N layers, the hub's tensors: GPT-OSS experts in MXFP4; tools/real_size_families.py).

Each step runs in a child process in a memory cgroup of its own (tools/real_size_measure.py says what is
measured, and what is used where no cgroup can be made); a step killed at its limit is an "OOM" row.
An export is deleted after its steps unless --keep. Disk per step: what it left (out) and the
filesystem's peak use while it ran (disk). Exit 0 when every step succeeded or was stopped by a memory
limit (a measurement), 1 when one failed otherwise.

Usage: PYTHONPATH=. python tools/bench_real_size.py [--layers 2] [--seed 0] [--work DIR | --checkpoint DIR]
       [--formats fp16,int8,int4] [--graphs auto,portable] [--export-limit 2G] [--retry-limit none]
       [--no-retry] [--run-limit none]
       [--build-limit none] [--build-formats fp16] [--skip-build] [--skip-run] [--keep] [--threads N] [--new-tokens 8]
       [--bench-tokens 16] [--timeout 3600] [--lock FILE] [--json FILE] [--tiny]
       [--family mixtral|gpt_oss|deepseek_v2]
Needs, at 2 layers: ~6.3 GB checkpoint + ~3x the largest export while it is written (fp16: ~19 GB);
fp32 (not in the default formats) is 12.6 GB of weights.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: the benchmark's modules

import real_size_ckpt as ckpt  # noqa: E402
import real_size_families as families  # noqa: E402
from real_size_measure import Measured, run_child  # noqa: E402
from real_size_table import GB, Row, format_report, run_numbers  # noqa: E402

FORMATS = {"fp32": ["--dtype", "fp32"], "fp16": ["--dtype", "fp16"], "int8": ["--quantize", "int8"],
           "int4": ["--quantize", "int4"], "int8-fp16": ["--quantize", "int8", "--dtype", "fp16"],
           "int4-fp16": ["--quantize", "int4", "--dtype", "fp16"],
           "int4-b64-fp16": ["--quantize", "int4", "--block-size", "64", "--dtype", "fp16"],
           "int4-b128-fp16": ["--quantize", "int4", "--block-size", "128", "--dtype", "fp16"]}
GRAPHS = ("auto", "portable")


def size(text: str) -> int | None:
    """'2G', '512M', '3000000000' -> bytes; 'none' / '0' -> None (no limit)."""
    t = text.strip().upper()
    if t in ("NONE", "0", ""):
        return None
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1], 1)
    try:
        value = float(t[:-1] if t[-1] in "KMG" else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size like 2G, 512M or none, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a positive size, got {text!r}")
    return int(value)


def names(choices: tuple[str, ...] | dict[str, Any]) -> Any:
    def parse(text: str) -> list[str]:
        got = [k.strip() for k in text.split(",") if k.strip()]
        bad = [k for k in got if k not in choices]
        if bad or not got:
            raise argparse.ArgumentTypeError(f"unknown {bad or text!r}; choose from {', '.join(choices)}")
        return got
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="Folder for the checkpoint, exports and logs (reused).")
    ap.add_argument("--checkpoint", type=Path, default=None, help="Use this Mixtral-8x7B-shaped checkpoint as is.")
    ap.add_argument("--formats", type=names(FORMATS), default=["fp16", "int8", "int4"])
    ap.add_argument("--graphs", type=names(GRAPHS), default=list(GRAPHS))
    ap.add_argument("--export-limit", type=size, default=size("2G"),
                    help="Memory limit of each export (none: no limit).")
    ap.add_argument("--retry-limit", type=size, default=None,
                    help="An export the export limit killed is exported again under this one (default: none), "
                         "so the later steps still run; the table keeps both rows.")
    ap.add_argument("--no-retry", action="store_true", help="Stop a format at an export the limit killed.")
    ap.add_argument("--run-limit", type=size, default=None, help="Memory limit of the fast-graph build and each run.")
    ap.add_argument("--build-limit", type=size, default=None, help="Memory limit of each engine build.")
    ap.add_argument("--build-formats", type=names(FORMATS), default=["fp16"])
    ap.add_argument("--skip-build", action="store_true", help="No TensorRT engine build.")
    ap.add_argument("--skip-run", action="store_true", help="Export only: no fast graph, runs or build.")
    ap.add_argument("--keep", action="store_true", help="Keep the exports (and a temporary --work) afterwards.")
    ap.add_argument("--threads", type=int, default=None, help="Session threads (default: mixport run's).")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--bench-tokens", type=int, default=16, help="Tokens timed for decode tok/s.")
    ap.add_argument("--timeout", type=float, default=3600, help="Seconds a step may take before it is killed.")
    ap.add_argument("--lock", type=Path, default=None, help="Hold an flock on FILE during each step (shared machines).")
    ap.add_argument("--json", type=Path, default=None, help="Also write the rows and the header to FILE.")
    ap.add_argument("--tiny", action="store_true", help="Tiny dimensions: the script's logic in seconds.")
    ap.add_argument("--family", choices=("mixtral", *families.FAMILIES), default="mixtral",
                    help="Whose real layers: Mixtral-8x7B (default), GPT-OSS-20B or DeepSeek-V2-Lite.")
    args = ap.parse_args(argv)
    if args.layers < 1 or args.new_tokens < 1 or args.bench_tokens < 2:
        ap.error("--layers and --new-tokens must be >= 1, --bench-tokens >= 2")
    return args


class Bench:
    """The state of one run: arguments, work folder, rows so far."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.rows: list[Row] = []
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self.args.lock is None:
            yield
            return
        with self.args.lock.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def step(self, kind: str, spec: dict[str, Any], name: str, limit: int | None) -> Measured:
        print(f"# {name}", file=sys.stderr, flush=True)
        with self._locked():
            m = run_child(kind, spec, self.logs / f"{name}.log", f"mixport-bench-{name}", limit, self.work,
                          self.args.timeout)
        print(f"#   {m.status}, {m.wall_s:.1f} s", file=sys.stderr, flush=True)
        return m

    def add(self, row: Row) -> Row:
        if row.m and row.m.status != "ok" and not row.notes:
            killed = f"killed at its {row.m.limit_bytes / GB:.1f} GiB limit" if row.m.status == "OOM" else ""
            row.notes = "; ".join(filter(None, (killed, last_line(Path(row.m.log)))))
        self.rows.append(row)
        return row


def last_line(log: Path) -> str:
    """The last non-empty line of a step's log (its error, when it failed)."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:160] if lines else ""


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def checkpoint(b: Bench) -> Path | None:
    """The checkpoint every format is exported from: --checkpoint, one reused from --work, or written."""
    args = b.args
    dims = family_dims(args)
    if args.checkpoint is not None:
        cfg = json.loads((args.checkpoint / "config.json").read_text())
        wrong = {k: cfg.get(k) for k, v in dims.items() if cfg.get(k) != v}
        if wrong:
            raise SystemExit(f"--checkpoint {args.checkpoint}: not at these dimensions: {wrong} (expected {dims})")
        args.layers = cfg["num_hidden_layers"]
        b.add(Row("checkpoint", "ckpt", status="given", out_bytes=du(args.checkpoint), notes=str(args.checkpoint)))
        return args.checkpoint
    folder = b.work / ckpt.folder_name(args.layers, args.seed, args.tiny, args.family)
    if ckpt.is_complete(folder, args.layers, args.seed, args.tiny, args.family):
        b.add(Row("checkpoint", "ckpt", status="reused", out_bytes=du(folder), notes=str(folder)))
        return folder
    if folder.exists():
        raise SystemExit(f"{folder} exists but is not a complete checkpoint of {args.layers} layers, seed "
                         f"{args.seed}: remove it")
    m = b.step("ckpt", {"folder": str(folder), "layers": args.layers, "seed": args.seed, "tiny": args.tiny,
                        "family": args.family},
               "checkpoint", None)
    ok = m.status == "ok"
    b.add(Row("checkpoint", "ckpt", m=m, out_bytes=du(folder) if ok else None,
              notes=f"{m.result.get('shards', '?')} shards, {folder}" if ok else ""))
    return folder if ok else None


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())


def export(b: Bench, src: Path, fmt: str, out: Path) -> bool:
    """`mixport export` of one format under --export-limit, retried under --retry-limit when the limit
    killed it (unless --no-retry), or a kept export reused; True when OUT is ready."""
    if (out / "manifest.json").is_file():
        b.add(Row(f"export {fmt}", "export", fmt, status="reused", out_bytes=du(out),
                  notes=f"{manifest(out)['dtype']}; kept by --keep (delete it to measure the export)"))
        return True
    argv = ["export", str(src), "-o", str(out), "--no-check", *FORMATS[fmt]]
    tries = [(f"export {fmt}", b.args.export_limit)]
    if not b.args.no_retry and b.args.export_limit is not None:
        tries.append((f"export {fmt} retry", b.args.retry_limit))
    for step, limit in tries:
        m = b.step("cli", {"argv": argv}, step.replace(" ", "-"), limit)
        ok = m.status == "ok"
        notes = f"dtype {manifest(out)['dtype']}; {' '.join(argv[4:])}" if ok else ""
        if m.status == "OOM" and step == tries[0][0] and len(tries) > 1:
            notes = f"{last_line(Path(m.log))} -> retried under {limit_words(b.args.retry_limit)}"
        b.add(Row(step, "export", fmt, m=m, out_bytes=du(out) if ok else None, notes=notes))
        if m.status != "OOM":
            break
    return m.status == "ok"


def limit_words(limit: int | None) -> str:
    return f"{limit / GB:.1f} GiB" if limit else "no limit"


def fast_graph(b: Bench, fmt: str, out: Path) -> None:
    m = b.step("fastgraph", {"folder": str(out)}, f"fastgraph-{fmt}", b.args.run_limit)
    row = b.add(Row(f"fast graph {fmt}", "fastgraph", fmt, m=m, out_bytes=m.result.get("bytes")))
    if m.status == "ok":
        row.notes = ", ".join(m.result["files"])
    else:
        row.notes += " (the auto run tries again: its load time includes the build)"


def runs(b: Bench, fmt: str, out: Path) -> None:
    ran_auto = None
    for asked in b.args.graphs:
        if asked == "portable" and ran_auto == "portable":
            b.add(Row(f"run {fmt} portable", "run", fmt, status="= auto", notes="auto ran model.onnx already"))
            continue
        spec = {"folder": str(out), "graph": asked, "threads": b.args.threads, "new_tokens": b.args.new_tokens,
                "bench_tokens": b.args.bench_tokens}
        m = b.step("run", spec, f"run-{fmt}-{asked}", b.args.run_limit)
        row = b.add(Row(f"run {fmt} {asked}", "run", fmt, m=m))
        if m.status == "ok":
            row.run = run_numbers(asked, m.result, b.args.new_tokens)
            ran_auto = row.run["ran"] if asked == "auto" else ran_auto
            row.notes = f"ran {row.run['ran']}; weights in {', '.join(row.run['weights_files'])}"


def build(b: Bench, fmt: str, out: Path) -> None:
    m = b.step("cli", {"argv": ["build", str(out)]}, f"build-{fmt}", b.args.build_limit)
    row = b.add(Row(f"build {fmt}", "build", fmt, m=m))
    engine = manifest(out).get("engine") if m.status == "ok" else None
    if engine:
        row.out_bytes = engine["bytes"]
        row.notes = (f"{engine['plugin_layer_count']} plugin layers, {engine['trt']}, targets "
                     f"{','.join(engine['targets'])}, build {engine['build_seconds']:.0f} s")


def one_format(b: Bench, src: Path, fmt: str) -> None:
    out = b.work / f"export-{fmt}-{src.name}"
    if export(b, src, fmt, out) and not b.args.skip_run:
        if "auto" in b.args.graphs:
            fast_graph(b, fmt, out)
        runs(b, fmt, out)
        if not b.args.skip_build and fmt in b.args.build_formats:
            build(b, fmt, out)
    if not b.args.keep and out.exists():
        shutil.rmtree(out)
    for left in b.work.glob(f".{out.name}.tmp-*"):  # the staging folder of an export killed at its limit
        shutil.rmtree(left, ignore_errors=True)


def family_dims(args: argparse.Namespace) -> dict[str, Any]:
    if args.family != "mixtral":
        return families.dims(args.family, args.tiny)
    return ckpt.TINY_DIMS if args.tiny else ckpt.DIMS


def header(b: Bench, src: Path | None, free0: int) -> list[str]:
    args, dims = b.args, family_dims(b.args)
    measures = sorted({r.m.measure for r in b.rows if r.m})
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem = next((ln.split()[1] for ln in meminfo if ln.startswith("MemTotal")), "0")
    if args.family == "mixtral":
        shape = (f"Mixtral-8x7B-shaped, {args.layers} layer(s) (hidden {dims['hidden_size']}, intermediate "
                 f"{dims['intermediate_size']}, {dims['num_attention_heads']}/{dims['num_key_value_heads']} heads x "
                 f"{dims['head_dim']}, {dims['num_local_experts']} experts top-{dims['num_experts_per_tok']}, vocab "
                 f"{dims['vocab_size']}), bf16 checkpoint")
    else:
        name = {"gpt_oss": "GPT-OSS-20B", "deepseek_v2": "DeepSeek-V2-Lite"}[args.family]
        shape = (f"{name}-shaped, {args.layers} layer(s) ({', '.join(f'{k} {v}' for k, v in dims.items())}), "
                 f"checkpoint")
    return [f"mixport real size{' [--tiny]' if args.tiny else ''}: {shape} {src}",
            f"machine: {os.cpu_count()} CPUs, {int(mem) / (1 << 20):.1f} GB RAM, load avg {os.getloadavg()[0]:.1f}, "
            f"{free0 / GB:.1f} GB free in {b.work} at the start; threads {args.threads or 'default'}",
            f"memory measure: {'; '.join(measures) or '-'}; export limit {limit_words(args.export_limit)}"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    temp = args.work is None
    work = (args.work or Path(tempfile.mkdtemp(prefix="mixport-real-size-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(work)
    free0 = st.f_bavail * st.f_frsize
    b = Bench(args, work)
    try:
        src = checkpoint(b)
        for fmt in args.formats if src else []:
            one_format(b, src, fmt)
    finally:
        if temp and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    head = header(b, src, free0)
    print(format_report(head, b.rows, args.export_limit))
    if args.json:
        args.json.write_text(json.dumps({"header": head, "work": str(work), "layers": args.layers,
                                         "formats": args.formats, "rows": [r.to_dict() for r in b.rows]}, indent=2))
    bad = [r for r in b.rows if r.state.startswith(("failed", "killed", "timeout"))]
    return 1 if bad or src is None else 0


if __name__ == "__main__":
    sys.exit(main())
