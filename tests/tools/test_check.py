"""`mixport check` beyond model.onnx: the fast ORT graph's part of the report."""

from __future__ import annotations

from pathlib import Path


def test_check_says_why_the_fast_graph_was_not_checked(tmp_path: Path) -> None:
    """head_dim 18 cannot use GroupQueryAttention: the report says the fast graph was skipped, and why."""
    from dataclasses import replace

    from mixport.exporter.export import export
    from mixport.exporter.tiny import TINY, write_tiny
    from mixport.tools.check import format_report, run_check

    src = write_tiny(tmp_path / "src", replace(TINY, hidden_size=72, head_dim=18, num_key_value_heads=1,
                                               intermediate_size=40), seed=7)
    export(src, tmp_path / "out")
    report = run_check(tmp_path / "out", steps=2, prefer_transformers=False)
    assert report.passed and report.fast is not None
    assert report.fast.skipped and "head_dim 18" in report.fast.skipped
    assert "fast ORT graph: not checked" in format_report(report)
