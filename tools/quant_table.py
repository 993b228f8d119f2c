"""The quantization benchmark's results, its same-run table and issue 12's targets (no heavy imports).

One ``Row`` per variant (mixport fp32/int8/int4, llama.cpp f32/q8_0/q4_0, ORT-GenAI int4). A variant
that could not run keeps its row with ``why`` set, and every target that needs it reads "n/a" with
that reason, so the table always says what was and was not compared.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

MIXPORT_FP32, MIXPORT_INT8, MIXPORT_INT4 = "mixport fp32", "mixport int8", "mixport int4"
LLAMA_F32, LLAMA_Q8, LLAMA_Q4 = "llama.cpp f32", "llama.cpp q8_0", "llama.cpp q4_0"
ORTGENAI_INT4 = "ORT-GenAI int4"
ORDER = (MIXPORT_FP32, MIXPORT_INT8, MIXPORT_INT4, LLAMA_F32, LLAMA_Q8, LLAMA_Q4, ORTGENAI_INT4)
INT4_FOLDER_MB = 150.0  # issue 12: int4 experts shrink the mini-Mixtral's 490 MB to under 150 MB


@dataclass
class Row:
    """One variant: its measurements, or why it has none (``why`` non-empty)."""

    name: str
    why: str = ""
    decode_tok_s: float | None = None
    prefill_tok_s: float | None = None
    size_mb: float | None = None  # what the tool writes: GGUF file, ORT-GenAI folder, `mixport export`'s folder
    max_err: float | None = None  # max |logit - transformers fp32 logit| over the teacher-forced tokens
    p50_err: float | None = None  # median over positions of the position's max |logit error|
    rms_err: float | None = None
    top1: float | None = None  # fraction of positions whose argmax equals transformers'
    peak_rss_mb: float | None = None  # `mixport run` in a child process (mixport rows only)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def set_errors(self, errors: dict[str, float]) -> None:
        """Fill the error fields from ``quant_common.logit_errors``."""
        for key, value in errors.items():
            setattr(self, key, value)


@dataclass(frozen=True)
class Target:
    """``num``'s metric against ``den``'s: a speed ratio that must reach ``at_least``, an error ratio
    that must stay at or under ``at_most``, or (``den`` None) an absolute bound on ``num``."""

    label: str
    num: str
    den: str | None
    metric: str  # "decode_tok_s" | "max_err" | "size_mb"
    at_least: float | None = None
    at_most: float | None = None


TARGETS = (
    Target("int8 decode >= llama.cpp q8_0", MIXPORT_INT8, LLAMA_Q8, "decode_tok_s", at_least=1.0),
    Target("int8 max logit error <= q8_0's", MIXPORT_INT8, LLAMA_Q8, "max_err", at_most=1.0),
    Target("int4 decode >= llama.cpp q4_0", MIXPORT_INT4, LLAMA_Q4, "decode_tok_s", at_least=1.0),
    Target("int4 max logit error <= q4_0's", MIXPORT_INT4, LLAMA_Q4, "max_err", at_most=1.0),
    Target("int4 decode >= 1.1x ORT-GenAI int4", MIXPORT_INT4, ORTGENAI_INT4, "decode_tok_s", at_least=1.1),
    Target("int4 max logit error <= 0.5x ORT-GenAI's", MIXPORT_INT4, ORTGENAI_INT4, "max_err", at_most=0.5),
    Target(f"int4 export folder < {INT4_FOLDER_MB:.0f} MB", MIXPORT_INT4, None, "size_mb", at_most=INT4_FOLDER_MB),
)

# Ratios printed under the table (numerator, denominator, metric), targets or not.
RATIOS = (
    (MIXPORT_FP32, LLAMA_F32, "decode_tok_s"), (MIXPORT_INT8, LLAMA_Q8, "decode_tok_s"),
    (MIXPORT_INT4, LLAMA_Q4, "decode_tok_s"), (MIXPORT_INT4, ORTGENAI_INT4, "decode_tok_s"),
    (MIXPORT_FP32, LLAMA_F32, "prefill_tok_s"), (MIXPORT_INT8, LLAMA_Q8, "prefill_tok_s"),
    (MIXPORT_INT4, LLAMA_Q4, "prefill_tok_s"), (MIXPORT_INT4, ORTGENAI_INT4, "prefill_tok_s"),
)


@dataclass
class Verdict:
    label: str
    status: str  # "met" | "not met" | "n/a" | "unsure" (a speed target measured on a loaded machine)
    detail: str


def _value(rows: dict[str, Row], name: str, metric: str) -> tuple[float | None, str]:
    """(the metric, "") or (None, why it is missing)."""
    row = rows.get(name)
    if row is None:
        return None, f"{name} not run"
    if not row.ok:
        return None, f"{name} not run (see its row)"
    got = getattr(row, metric)
    if got is None or (isinstance(got, float) and math.isnan(got)):
        return None, f"{name} has no {metric.replace('_', ' ')} (see its row)"
    return float(got), ""


def ratio(rows: dict[str, Row], num: str, den: str, metric: str) -> tuple[float | None, str]:
    a, why_a = _value(rows, num, metric)
    b, why_b = _value(rows, den, metric)
    if a is None or b is None:
        return None, why_a or why_b
    if b == 0:
        return (math.inf if a > 0 else 1.0), ""
    return a / b, ""


def judge(target: Target, rows: dict[str, Row]) -> Verdict:
    """Whether ``target`` is met by ``rows`` (n/a, with the reason, when a side is missing)."""
    if target.den is None:
        got, why = _value(rows, target.num, target.metric)
        if got is None:
            return Verdict(target.label, "n/a", why)
        ok = got <= target.at_most if target.at_most is not None else got >= (target.at_least or 0.0)
        return Verdict(target.label, "met" if ok else "not met", f"{got:.1f}")
    got, why = ratio(rows, target.num, target.den, target.metric)
    if got is None:
        return Verdict(target.label, "n/a", why)
    ok = got >= target.at_least if target.at_least is not None else got <= (target.at_most or 0.0)
    bound = f">= {target.at_least:g}" if target.at_least is not None else f"<= {target.at_most:g}"
    return Verdict(target.label, "met" if ok else "not met", f"ratio {got:.2f} (needs {bound})")


def judge_all(rows: dict[str, Row], targets: tuple[Target, ...] = TARGETS, loaded: bool = False) -> list[Verdict]:
    """Every target's verdict; with LOADED (other jobs shared the cores) a measured speed target is
    "unsure": llama.cpp's decode collapses under load while ONNX Runtime's does not, so its ratio says
    nothing about the tools."""
    verdicts = [judge(t, rows) for t in targets]
    if loaded:
        for t, v in zip(targets, verdicts, strict=True):
            if t.metric.endswith("tok_s") and v.status in ("met", "not met"):
                v.detail += f"; {v.status} on a loaded machine: rerun quiet"
                v.status = "unsure"
    return verdicts


def _fmt(value: float | None, spec: str) -> str:
    """VALUE formatted by SPEC (e.g. "12.1f"), or "-" right-aligned to the same width."""
    return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0]))


def format_rows(rows: dict[str, Row]) -> list[str]:
    head = (f"  {'variant':<16} {'decode tok/s':>12} {'prefill tok/s':>13} {'size MB':>8} {'run RSS MB':>10} "
            f"{'max |err|':>10} {'p50 |err|':>9} {'RMS err':>9} {'top-1':>6}")
    lines = [head]
    for name in [n for n in ORDER if n in rows] + [n for n in rows if n not in ORDER]:
        r = rows[name]
        if not r.ok:
            lines.append(f"  {name:<16} not run: {r.why}")
            continue
        lines.append(f"  {name:<16} {_fmt(r.decode_tok_s, '12.1f')} {_fmt(r.prefill_tok_s, '13.0f')} "
                     f"{_fmt(r.size_mb, '8.1f')} {_fmt(r.peak_rss_mb, '10.0f')} {_fmt(r.max_err, '10.4f')} "
                     f"{_fmt(r.p50_err, '9.4f')} {_fmt(r.rms_err, '9.5f')} {_fmt(r.top1, '6.3f')}")
        lines.extend(f"  {'':<16} ({note})" for note in r.notes)
    return lines


def format_ratios(rows: dict[str, Row]) -> list[str]:
    lines = []
    for num, den, metric in RATIOS:
        got, why = ratio(rows, num, den, metric)
        what = metric.replace("_tok_s", "")
        lines.append(f"  {num} / {den} {what}: " + (f"{got:.2f}x" if got is not None else f"n/a ({why})"))
    errs = [(n, rows[n].max_err) for n in ORDER if n in rows and rows[n].ok and rows[n].max_err is not None]
    if errs:
        lines.append("  max |logit error| side by side: " + ", ".join(f"{n} {e:.4f}" for n, e in errs))
    return lines


def format_report(rows: dict[str, Row], header: str, loaded: bool = False) -> str:
    verdicts = judge_all(rows, loaded=loaded)
    out = [header, *format_rows(rows), "ratios (same run):", *format_ratios(rows), "issue 12 targets:"]
    out += [f"  [{v.status:^7}] {v.label}: {v.detail}" for v in verdicts]
    return "\n".join(out)
