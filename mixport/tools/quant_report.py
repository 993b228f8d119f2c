"""The quantization error table ``mixport check`` prints for a quantized folder.

A row per metric, its limit, then a column per backend (``-``: not measured there); each cell
ends with ``ok`` or ``FAIL``. Informative rows (the cache outputs) carry no limit.
"""

from __future__ import annotations

from collections.abc import Callable

from mixport.tools import quant_metrics as qe

Cell = Callable[[qe.BackendStat], "str | None"]


def _judged(text: str, ok: bool) -> str:
    return f"{text} {'ok' if ok else 'FAIL'}"


def _rows(report: qe.QuantReport) -> list[tuple[str, str, Cell]]:
    lim = report.limits

    def logits(b: qe.BackendStat) -> qe.ErrorStat:
        return b.outputs[0]

    rows: list[tuple[str, str, Cell]] = [
        ("err vs dequantized ref", "(in cell)",
         lambda b: _judged(f"{'RMS' if b.implementation_limit == qe.APPROXIMATE else 'max'} "
                           f"{b.implementation_judged / logits(b).scale:.1e} <= {b.implementation_limit:g}",
                           b.implementation_ok(logits(b).scale))),
        ("logits RMS err / scale", f"<= {lim.rms_logit:g}",
         lambda b: _judged(f"{logits(b).rms_rel:.4f} ({logits(b).rms:.2e})", logits(b).rms_rel <= lim.rms_logit)),
        ("top-1 (teacher-forced)", f">= {lim.top1:g}",
         lambda b: _judged(f"{b.top1}/{b.positions} {b.top1 / b.positions:.3f}", b.top1 >= lim.top1 * b.positions)),
        ("logits max |err| / scale", "(shown)", lambda b: f"{logits(b).max_rel:.4f} ({logits(b).max_abs:.2e})"),
        ("greedy prefix (free-running)", "(shown)",
         lambda b: f"{round(report.greedy_agreement(b.greedy) * len(report.ref_tokens))}/{len(report.ref_tokens)}"),
    ]
    layers = max((b.routing for b in report.backends), key=len, default=[])
    for j, r in enumerate(layers):
        rows.append((f"experts, layer {r.layer}", f">= {lim.experts:g}", _expert_cell(j, lim.experts)))
    if report.ref_perplexity is not None:
        ref = report.ref_perplexity
        rows.append((f"perplexity (ref {ref:.4g})", f"<= x{lim.perplexity:g}",
                     lambda b: None if b.perplexity is None else
                     _judged(f"{b.perplexity:.4g} x{b.perplexity / ref:.4f}", b.perplexity <= lim.perplexity * ref)))
    for kv in ("key", "value"):
        rows.append((f"present.*.{kv} max / RMS", "(shown)", _cache_cell(f"present.*.{kv}")))
    return rows


def _expert_cell(j: int, limit: float) -> Cell:
    def cell(b: qe.BackendStat) -> str | None:
        if j >= len(b.routing):
            return None
        r = b.routing[j]
        ties = f" ({r.tie_mismatch} on ties)" if r.tie_mismatch else ""
        return _judged(f"{r.agree + r.tie_mismatch}/{r.tokens} {qe.agreement(r):.3f}{ties}", qe.agreement(r) >= limit)
    return cell


def _cache_cell(name: str) -> Cell:
    def cell(b: qe.BackendStat) -> str | None:
        stat = next((o for o in b.outputs if o.name == name), None)
        return None if stat is None else f"{stat.max_abs:.2e} / {stat.rms:.2e}"
    return cell


def table(report: qe.QuantReport) -> list[str]:
    measured = [b for b in report.backends if b.skipped is None]
    n = len(report.ref_tokens)
    positions = measured[0].positions if measured else 0
    head = [f"quantization error: {qe.describe(report.record)} vs fp32 {report.reference} (the unquantized source)",
            f"  {positions} teacher-forced positions ({positions - n} prompt + {n} reference greedy), "
            f"{n} free-running greedy steps"
            + (f", perplexity on {report.text} ({report.text_tokens} tokens)" if report.text else "")]
    rows = [(name, limit, [cell(b) or "-" for b in measured]) for name, limit, cell in _rows(report)]
    widths = [max(len(r[2][i]) for r in rows) for i in range(len(measured))]
    widths = [max(w, len(b.name)) for w, b in zip(widths, measured, strict=True)]
    lines = head + [f"  {'metric':<29} {'limit':<9} " + "  ".join(f"{b.name:<{w}}" for b, w in zip(measured, widths,
                                                                                                  strict=True))]
    for name, limit, cells in rows:
        lines.append(f"  {name:<29} {limit:<9} " + "  ".join(f"{c:<{w}}" for c, w in zip(cells, widths, strict=True)))
    lines += [f"  {b.name}: not measured ({b.skipped})" for b in report.backends if b.skipped is not None]
    if report.dense_layers:
        lines.append(f"  (dense MLP, no router: layer {', '.join(map(str, report.dense_layers))})")
    verdict = "PASSED" if report.passed else "FAILED: " + ", ".join(report.failures())
    lines.append(f"quantization error: {verdict} (limits for {report.scheme})")
    return [line.rstrip() for line in lines]
