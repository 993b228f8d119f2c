"""The rows and the printed report of tools/bench_real_size.py (standard library only)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from real_size_measure import Measured

MB = 1 << 20
GB = 1 << 30


@dataclass
class Row:
    """One step: ``kind`` ckpt | export | fastgraph | run | build, for export format ``fmt``."""

    step: str
    kind: str
    fmt: str = ""
    m: Measured | None = None
    status: str = ""  # "" = the child's (m.status); else e.g. "reused", "skipped: ..."
    out_bytes: int | None = None  # what the step left on disk (checkpoint, export folder, graph file, engine)
    notes: str = ""
    run: dict[str, Any] = field(default_factory=dict)  # run rows: run_numbers()

    @property
    def state(self) -> str:
        return self.status or (self.m.status if self.m else "")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state
        return d


def run_numbers(asked: str, got: dict[str, Any], new_tokens: int) -> dict[str, Any]:
    """A run child's result -> the run table's numbers (MB, ratios to the weights the session uses)."""
    weights = got["weights"]["bytes"]
    # what the CPU session computes with: ONNX Runtime's CPU provider converts fp16 weights to fp32 at load
    held = weights + got["weights"].get("fp16", 0)
    base, loaded, generated, end = got["base"], got["loaded"], got["generated"], got["status"]
    rss = loaded["VmRSS"]
    return {"asked": asked, "ran": got["graph"], "backend": got["backend"], "load_s": got["load_s"],
            "base_mb": base["VmRSS"] / MB, "rss_mb": rss / MB, "anon_mb": loaded.get("RssAnon", 0) / MB,
            "file_mb": loaded.get("RssFile", 0) / MB, "weights_mb": weights / MB,
            "weights_files": got["weights"]["files"],
            "rss_per_weight": rss / weights, "net_per_weight": (rss - base["VmRSS"]) / weights,
            "held_mb": held / MB, "net_per_held": (rss - base["VmRSS"]) / held,
            "gen_rss_mb": generated["VmRSS"] / MB, "hwm_mb": end["VmHWM"] / MB,
            "tokens": len(got["tokens"]), "tokens_ok": len(got["tokens"]) == new_tokens,
            "generate_s": got["generate_s"], "prefill_ms": got["prefill_ms"], "decode_tok_s": got["decode_tok_s"]}


def _num(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def _mb(value: float) -> str:
    """MB with the digits a small (--tiny) model needs."""
    return f"{value:.0f}" if value >= 100 else f"{value:.2f}"


def steps_table(rows: list[Row]) -> list[str]:
    head = (f"{'step':<24} {'status':<12} {'wall s':>7} {'limit':>6} {'peak MiB':>8} {'anon MiB':>8} "
            f"{'VmHWM MiB':>9} {'out GiB':>7} {'disk GiB':>8}  notes")
    lines = [head]
    for r in rows:
        m = r.m or Measured()
        limit = f"{m.limit_bytes / GB:.1f}G" if m.limit_bytes else "-"
        lines.append(f"{r.step:<24} {r.state[:12]:<12} {_num(m.wall_s if r.m else None, 1, 1):>7} {limit:>6} "
                     f"{_num(m.peak_bytes, MB):>8} {_num(m.cgroup_anon_peak_bytes, MB):>8} "
                     f"{_num(m.vmhwm_bytes or m.ru_maxrss_bytes if r.m else None, MB):>9} "
                     f"{_num(r.out_bytes, GB, 2):>7} {_num(m.disk_peak_bytes if r.m else None, GB, 2):>8}  {r.notes}")
    return lines


def runs_table(rows: list[Row]) -> list[str]:
    head = (f"{'export':<9} {'asked':<8} {'ran':<8} {'load s':>7} {'base MiB':>8} {'RSS MiB':>8} {'anon MiB':>8} "
            f"{'file MiB':>8} {'weights MiB':>11} {'RSS/w':>6} {'(RSS-base)/w':>12} {'held MiB':>8} "
            f"{'(RSS-base)/held':>15} {'gen RSS':>8} {'VmHWM':>8} "
            f"{'tokens':>6} {'tok/s':>7}")
    lines = [head]
    for r in rows:
        if r.kind != "run":
            continue
        n = r.run
        if not n:
            lines.append(f"{r.fmt:<9} {r.step.rsplit(' ', 1)[-1]:<8} {r.state}  ({r.notes})")
            continue
        lines.append(f"{r.fmt:<9} {n['asked']:<8} {n['ran']:<8} {n['load_s']:>7.1f} {n['base_mb']:>8.0f} "
                     f"{n['rss_mb']:>8.0f} {n['anon_mb']:>8.0f} {n['file_mb']:>8.0f} {_mb(n['weights_mb']):>11} "
                     f"{n['rss_per_weight']:>6.2f} {n['net_per_weight']:>12.2f} "
                     f"{_mb(n.get('held_mb', n['weights_mb'])):>8} {n.get('net_per_held', n['net_per_weight']):>15.2f} "
                     f"{n['gen_rss_mb']:>8.0f} "
                     f"{n['hwm_mb']:>8.0f} {n['tokens']:>6} {n['decode_tok_s']:>7.2f}")
    return lines


LEGEND = """\
Memory in MiB (2^20 bytes), disk in GiB.
peak: the step's cgroup peak when it ran in one (memory.max_usage_in_bytes: the pages first charged to
  it, anonymous AND page cache, e.g. files it wrote or first read; shared libraries already cached by
  others are not; its limit counts the same), else its VmHWM. OOM: killed by that limit.
anon: the cgroup's anonymous memory, sampled every 0.2 s. VmHWM: the process's own peak RSS (for a
  killed child: ru_maxrss, which includes the parent's RSS at fork).
out: what the step left on disk; disk: the filesystem's peak use during the step (statvfs: other
  jobs' writes count too).
runs: base = RSS after importing everything, before load (the fixed overhead); RSS = VmRSS after
  load (anon + file-backed); weights = bytes of the initializers of the graph the session loads
  (model.onnx(+.data), or model.ort.onnx and the bytes it points at, plus what it makes at load);
  held = the weights as the CPU session computes with them (ONNX Runtime's CPU provider converts fp16
  weights to fp32 at load, so fp16 bytes count twice): the issue's target is (RSS - base) / held;
  gen RSS: after generating; VmHWM: the run's peak; tokens: greedy tokens generated; tok/s: decode
  after a short prompt."""


NET_TARGET = 1.15  # issue 15: a session's RSS <= ~1.15 x its weights + the fixed overhead


def targets(rows: list[Row], export_limit: int | None) -> list[str]:
    """Issue 15's two memory targets, per format / run: met, not met (with the number), or why unknown."""
    exports = [r for r in rows if r.kind == "export" and not r.step.endswith("retry")]
    words = []
    for r in exports:
        if export_limit is None or not r.m:
            words.append(f"{r.fmt} n/a ({r.state}, no limit)")
        else:
            words.append(f"{r.fmt} {'yes' if r.state == 'ok' else 'no'} ({r.state})")
    runs = []
    for r in rows:
        if r.kind == "run" and r.run:
            held = r.run.get("net_per_held", r.run["net_per_weight"])
            ok = held <= NET_TARGET
            runs.append(f"{r.fmt} {r.run['asked']}->{r.run['ran']} {'yes' if ok else 'no'} ({held:.2f})")
        elif r.kind == "run":
            runs.append(f"{r.fmt} {r.step.rsplit(' ', 1)[-1]} {'no' if r.state == 'OOM' else '?'} ({r.state})")
    limit = f"{export_limit / GB:.1f} GiB" if export_limit else "a limit"
    return [f"issue 15 targets: export inside {limit}: {', '.join(words) or '-'}",
            f"  (RSS - base) <= {NET_TARGET} x held weights after load: {', '.join(runs) or '-'}"]


def format_report(header: list[str], rows: list[Row], export_limit: int | None = None) -> str:
    lines = [*header, "", *steps_table(rows)]
    if any(r.kind == "run" for r in rows):
        lines += ["", *runs_table(rows)]
    return "\n".join([*lines, "", *targets(rows, export_limit), "", LEGEND])
