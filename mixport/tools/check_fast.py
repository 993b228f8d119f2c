"""Parity of the fast ONNX Runtime graph (what `mixport run` uses on CPU) with the reference.

The Polygraphy comparison covers model.onnx; `mixport run` on CPU runs model.ort.onnx, a
rewrite of the same weights. This replays the reference's tokens through it (teacher-forced
logits) and lets it generate on its own (free-running greedy tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mixport.artifact import Manifest
from mixport.errors import RuntimeFailure


@dataclass
class FastGraphStat:
    max_abs: float = 0.0
    within: bool = True  # every step's logits within atol + rtol * |reference|
    tokens: list[int] = field(default_factory=list)
    skipped: str | None = None  # why the fast graph was not checked
    built: bool = False  # the check built it (the folder had no current fast graph): the report says so


def check_fast_graph(folder: Path, manifest: Manifest, prompt: list[int], ref_tokens: list[int],
                     ref_logits: list[np.ndarray], atol: float, rtol: float) -> FastGraphStat:
    from mixport.runtime import ort_graph
    from mixport.runtime.ort_fast import OrtFastSession

    why = ort_graph.supported(manifest.config, manifest.dtype)
    if why:
        return FastGraphStat(skipped=f"`mixport run` uses model.onnx for this model ({why})")
    built: list[str] = []
    try:  # built from model.onnx only when it is the exported file (run_check makes sure of that)
        session = OrtFastSession(ort_graph.ensure(folder, manifest, progress=built.append), manifest)
    except RuntimeFailure as exc:
        return FastGraphStat(skipped=f"fast graph unavailable: {exc}")
    stat = FastGraphStat(built=bool(built))
    session.reset(1)
    ids = np.array([prompt], dtype=np.int64)
    mask, pos = np.ones_like(ids), np.arange(len(prompt), dtype=np.int64)[None]
    for want, token in zip(ref_logits, ref_tokens, strict=False):
        got = session.step(ids, mask, pos)[0, -1].astype(np.float32)
        err = np.abs(got - want)
        stat.max_abs = max(stat.max_abs, float(err.max()))
        stat.within &= bool((err <= atol + rtol * np.abs(want)).all())
        ids, pos = np.array([[token]], dtype=np.int64), pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
    stat.tokens = greedy_tokens(session, prompt, len(ref_tokens))
    session.close()
    return stat


def greedy_tokens(session: Any, prompt: list[int], count: int) -> list[int]:
    """``count`` free-running greedy tokens after ``prompt`` (EOS does not stop them)."""
    from mixport.runtime.generate import GenerationRequest, generate

    req = GenerationRequest([prompt], count, eos_ids=())
    return generate(session, req, context=len(prompt) + count + 1)[0]
