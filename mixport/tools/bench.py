"""``mixport bench``: prefill latency and decode throughput of an export folder.

Timed through the generation loop's own calls (``generate.last_logits`` on the
session ``mixport run`` opens): one warm-up run, then the median of ``runs``.
Greedy, no early stop, so every run decodes exactly ``new_tokens`` tokens. The result
names what was measured: the backend (onnxruntime / tensorrt), the graph it ran
(ONNX Runtime's fast or portable graph, TensorRT's engine), why that backend and, when ONNX
Runtime ran the portable model.onnx, why not the fast graph (e.g. a family it does not build yet).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mixport import config_fields
from mixport.errors import RuntimeFailure
from mixport.runtime import memory
from mixport.runtime.generate import last_logits, left_pad
from mixport.runtime.session import Session

# B batch, L prompt length, N new tokens


@dataclass
class BenchRow:
    batch: int
    prompt_len: int
    new_tokens: int
    prefill_ms: float  # median, whole batch
    decode_ms_per_step: float  # median
    decode_tok_s: float  # batch * steps / decode time (all rows)
    runs: int


def rss_mb() -> float:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def time_once(session: Session, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for new_tokens - 1 steps), greedy."""
    ids, mask, pos = left_pad(prompts, 0)
    b = len(prompts)
    session.reset(b)
    if hasattr(session, "reserve"):
        session.reserve(ids.shape[1] + new_tokens)
    t0 = time.perf_counter()
    nxt = last_logits(session, ids, mask, pos).argmax(-1)
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        nxt = last_logits(session, nxt[:, None].astype(np.int64), mask, pos).argmax(-1)
    return t1 - t0, time.perf_counter() - t1


def bench_session(session: Session, vocab: int, context: int, prompt_len: int, new_tokens: int,
                  batch: int, runs: int, seed: int = 0) -> BenchRow:
    if prompt_len < 1 or new_tokens < 2 or batch < 1 or runs < 1:
        raise RuntimeFailure("invalid bench sizes", given=f"prompt {prompt_len}, new {new_tokens}, "
                             f"batch {batch}, runs {runs}", expected="prompt >= 1, new >= 2, batch >= 1, runs >= 1")
    if prompt_len + new_tokens > context:
        raise RuntimeFailure("prompt + new tokens exceed the model's context",
                             given=prompt_len + new_tokens, expected=f"<= {context}")
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, prompt_len).tolist() for _ in range(batch)]
    time_once(session, prompts, min(new_tokens, 4))  # warm-up: allocations, kernels, caches
    times = [time_once(session, prompts, new_tokens) for _ in range(runs)]
    prefill = statistics.median(t[0] for t in times)
    decode = statistics.median(t[1] for t in times)
    steps = new_tokens - 1
    return BenchRow(batch, prompt_len, new_tokens, prefill * 1e3, decode / steps * 1e3,
                    batch * steps / decode, runs)


def available_mb() -> float | None:
    """MemAvailable (Linux), in MiB, or None where unknown."""
    free = memory.available_memory()
    return None if free is None else free / 2**20


def check_sizes(config: dict[str, object], dtype: str, prompt_len: int, new_tokens: int,
                batches: tuple[int, ...]) -> None:
    """Refuse sizes the model or this machine cannot run, before anything is loaded."""
    keys = ("max_position_embeddings", "num_hidden_layers", "num_key_value_heads", "head_dim", "vocab_size")
    n = {k: config.get(k) for k in keys}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in n.values()):
        return  # a malformed manifest: load() reports it
    context: int = n["max_position_embeddings"]  # type: ignore[assignment]
    if prompt_len + new_tokens > context:
        raise RuntimeFailure("prompt + new tokens exceed the model's context",
                             given=f"--prompt-len {prompt_len} + --new-tokens {new_tokens}", expected=f"<= {context}")
    item = 2 if dtype in ("fp16", "bf16") else 4
    batch, tokens = max(batches), min(max(prompt_len + new_tokens, 256), context)  # the fast graph's capacity
    per_token = sum(h * w for h, w in config_fields.cache_dims(config))  # one layer's k + v (MLA: latent + rope)
    cache = batch * n["num_hidden_layers"] * per_token * tokens * item  # type: ignore[operator]
    logits = batch * prompt_len * n["vocab_size"] * 4  # type: ignore[operator]  # the portable graph's prefill logits [B, L, V]
    need, free = (cache + logits) / 2**20, available_mb()
    if free is not None and need > free:
        raise RuntimeFailure("the batch does not fit in memory", given=f"--batch {batch}: about {need:,.0f} MB "
                             "of KV cache and logits", expected=f"under the {free:,.0f} MB available",
                             hint="use a smaller --batch or --prompt-len")


def graph_reason(manifest_config: dict[str, object], dtype: str, backend: str, ran: str, asked: str) -> str:
    """Why ONNX Runtime ran the portable model.onnx ("" when it ran the fast graph, or TensorRT ran)."""
    from mixport.runtime import ort_graph

    if backend != "onnxruntime" or ran != "portable":
        return ""
    if asked == "portable":
        return "portable graph: --graph portable"
    why = ort_graph.supported(manifest_config, dtype)
    return (f"portable graph, not the fast graph: {why}" if why
            else "portable graph: the fast graph could not be built (see the line above)")


def bench_folder(folder: Path, prompt_len: int = 64, new_tokens: int = 128, batches: tuple[int, ...] = (1,),
                 runs: int = 3, threads: int | None = None, graph: str = "auto",
                 progress: object = None, backend: str = "auto") -> dict[str, object]:
    """Load FOLDER like ``mixport run`` does and time each batch size. The result's ``backend``
    ("onnxruntime" | "tensorrt") and ``graph`` ("fast" | "portable" | "engine") say what ran."""
    from mixport.artifact import Manifest
    from mixport.runtime import load

    manifest = Manifest.read(Path(folder))
    check_sizes(manifest.config, manifest.dtype, prompt_len, new_tokens, batches)
    pipe = load(folder, threads=threads, graph=graph, progress=progress, backend=backend)  # type: ignore[arg-type]
    rss_before = rss_mb()
    rows = [bench_session(pipe.session, int(pipe.config["vocab_size"]), pipe.context, prompt_len, new_tokens,
                          b, runs) for b in batches]
    return {"folder": str(folder), "backend": pipe.backend, "graph": pipe.graph,
            "backend_reason": pipe.backend_reason,
            "graph_reason": graph_reason(manifest.config, manifest.dtype, pipe.backend, pipe.graph, graph),
            "threads": threads, "rss_mb_before": round(rss_before, 1), "rss_mb_after": round(rss_mb(), 1),
            "rows": [asdict(r) for r in rows]}


def format_table(result: dict[str, object]) -> str:
    head = f"{'batch':>5} {'prompt':>6} {'new':>5} {'prefill ms':>11} {'ms/step':>8} {'decode tok/s':>13}"
    lines = [f"backend: {result['backend']}, graph: {result['graph']}  "
             f"RSS {result['rss_mb_before']} -> {result['rss_mb_after']} MB", f"  {result['backend_reason']}"]
    if result.get("graph_reason"):
        lines.append(f"  {result['graph_reason']}")
    lines.append(head)
    for r in result["rows"]:  # type: ignore[union-attr]
        lines.append(f"{r['batch']:>5} {r['prompt_len']:>6} {r['new_tokens']:>5} {r['prefill_ms']:>11.1f} "
                     f"{r['decode_ms_per_step']:>8.2f} {r['decode_tok_s']:>13.1f}")
    return "\n".join(lines)


def to_json(result: dict[str, object]) -> str:
    return json.dumps(result, indent=2)
