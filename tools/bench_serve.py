"""Load benchmark of `mixport serve`: N concurrent streaming clients against one server on 127.0.0.1.

Starts `mixport serve OUT` (default OUT: the mini-Mixtral of tools/bench_run.py, built and exported
into --work once), then for each N in --clients runs N clients, each sending --requests streaming
completions one after another (greedy, --max-tokens each, prompts of mixed lengths), and reports per N:

* aggregate decode tokens/s: completion tokens of all requests / the phase's wall time;
* time to first token (request sent -> first token's chunk) p50 / p99, inter-token latency (token
  -> next token of one stream, each token its own chunk: the requests ask for logprobs) p50 / p99;
* errors (HTTP errors, cut streams, timeouts) and lost requests (sent, never finished: no
  finish_reason by the end of the phase).

The summary line gives "aggregate decode at 8 clients / at 1 client" (target >= 2.5x) and p99 TTFT
at 8 clients (target < 2 s). --memory-run K sends K more requests (8 clients) and prints the
server's RSS at the start, the middle and the end of them. Bounded: --time-limit seconds in all
(clients stop sending at the deadline, a request times out after --request-timeout). The server is
stopped with SIGTERM at the end and must exit 0.

Usage: PYTHONPATH=. python tools/bench_serve.py [--out OUT] [--work DIR] [--clients 1,4,8,16]
       [--requests 4] [--max-tokens 64] [--max-batch 16] [--threads 2] [--memory-run 500 --memory-max-tokens 16]
       [--time-limit 1200] [--json] [--tiny]
(--tiny: the built-in tiny model, clients 1,2, a few tokens: the script's logic in seconds.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: bench_run's mini-Mixtral builder

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # never another address
WORDS = ("the model routes every token to two of its eight experts and the server batches the requests "
         "that arrive while others decode").split()


@dataclass
class Result:
    """One request: when it was sent, the arrival time of each text chunk, how it ended."""

    sent: float
    chunks: list[float] = field(default_factory=list)  # arrival time of each token
    tokens: int = 0
    finish: str | None = None
    error: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def build_export(work: Path, tiny: bool) -> Path:
    """The export to serve: the mini-Mixtral (as bench_run.py builds it) or, with --tiny, TINY."""
    if not tiny:
        from bench_run import build_export as build_mini

        return build_mini(work)[1]
    from mixport.exporter.export import export
    from mixport.exporter.tiny import write_tiny

    src, out = work / "tiny-src", work / "tiny-export"
    if not (out / "manifest.json").is_file():
        write_tiny(src)
        export(src, out, force=True)
    return out


def start_server(out: Path, port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mixport.cli", "serve", str(out), "--host", HOST, "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", "256", "--drain-timeout", "10"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with log.open("w") as err:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)


def wait_ready(proc: subprocess.Popen, base: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the server was not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM, then the exit code (SIGKILL to the process group after 60 s)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -9
    return proc.returncode


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prompt(i: int) -> str:
    n = 4 + (i * 7) % 24  # mixed lengths
    return " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n))


async def one_request(client: httpx.AsyncClient, base: str, i: int, max_tokens: int, timeout: float) -> Result:
    # logprobs: each token comes as its own chunk, even one whose text the server holds back (a token
    # that ends inside a UTF-8 character, frequent with random weights): TTFT and ITL count tokens
    body = {"model": "bench", "prompt": prompt(i), "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": 1}
    res = Result(sent=time.perf_counter())
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", f"{base}/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                    return res
                async for line in resp.aiter_lines():
                    _take(res, line)
    except (httpx.HTTPError, TimeoutError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


def _take(res: Result, line: str) -> None:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return
    chunk = json.loads(line[6:])
    if chunk.get("error"):
        res.error = str(chunk["error"].get("message"))
    for choice in chunk.get("choices", []):
        tokens = len((choice.get("logprobs") or {}).get("tokens") or ())
        res.chunks += [time.perf_counter()] * tokens
        res.finish = choice.get("finish_reason") or res.finish
    if chunk.get("usage"):
        res.tokens = chunk["usage"]["completion_tokens"]


async def run_clients(base: str, clients: int, requests: int, max_tokens: int, timeout: float,
                      deadline: float, offset: int = 0, progress: Any = None,
                      total: int | None = None) -> tuple[list[Result], float, int]:
    """Each client sends REQUESTS one after another (all together at most TOTAL); (results, wall
    seconds, requests not sent because of the deadline)."""
    results: list[Result] = []
    skipped, sent = 0, 0

    async def client(c: int) -> None:
        nonlocal skipped, sent
        for r in range(requests):
            if total is not None and sent >= total:
                return
            if time.monotonic() > deadline:
                skipped += requests - r
                return
            sent += 1
            results.append(await one_request(http, base, offset + c * requests + r, max_tokens, timeout))
            if progress:
                progress(len(results))

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        return results, time.perf_counter() - start, skipped


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(clients: int, results: list[Result], wall: float, skipped: int) -> dict[str, Any]:
    ok = [r for r in results if r.error is None and r.finish is not None]
    ttft = [r.chunks[0] - r.sent for r in ok if r.chunks]
    itl = [b - a for r in ok for a, b in zip(r.chunks, r.chunks[1:], strict=False)]
    tokens = sum(r.tokens for r in ok)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "agg_tok_s": tokens / wall if wall else 0.0, "ttft_p50_ms": 1e3 * pct(ttft, 50),
            "ttft_p99_ms": 1e3 * pct(ttft, 99), "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p99_ms": 1e3 * pct(itl, 99),
            "errors": sum(r.error is not None for r in results),
            "lost": sum(r.error is None and r.finish is None for r in results), "not_sent": skipped}


def table(rows: list[dict[str, Any]]) -> str:
    head = ("clients", "requests", "tokens", "wall_s", "agg_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
            "itl_p99_ms", "errors", "lost")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{row[h]:.1f}" if isinstance(row[h], float) else str(row[h]) for h in head]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["clients"]: r for r in rows}
    one, eight = by.get(1), by.get(8)
    found: dict[str, Any] = {"errors": sum(r["errors"] for r in rows), "lost": sum(r["lost"] for r in rows)}
    if one and eight and one["agg_tok_s"]:
        found["ratio_8_over_1"] = eight["agg_tok_s"] / one["agg_tok_s"]
        found["ttft_p99_at_8_s"] = eight["ttft_p99_ms"] / 1e3
    return found


async def memory_run(base: str, pid: int, count: int, max_tokens: int, timeout: float,
                     deadline: float) -> dict[str, Any]:
    """COUNT requests from 8 clients; server RSS at the start, after half of them, at the end."""
    marks = {"start_mb": rss_mb(pid)}

    def progress(done: int) -> None:
        if done == count // 2:
            marks["middle_mb"] = rss_mb(pid)

    clients = 8
    results, wall, skipped = await run_clients(base, clients, -(-count // clients), max_tokens, timeout,
                                               deadline, offset=10_000, progress=progress, total=count)
    marks["end_mb"] = rss_mb(pid)
    marks.setdefault("middle_mb", float("nan"))
    growth = marks["end_mb"] - marks["middle_mb"]
    return {"requests": len(results), "wall_s": wall, "errors": sum(r.error is not None for r in results),
            "not_sent": skipped, **marks, "end_minus_middle_mb": growth,
            "flat": bool(abs(growth) <= max(16.0, 0.03 * marks["middle_mb"]))}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="An export folder to serve [default: build the mini-Mixtral].")
    ap.add_argument("--work", type=Path, help="Where the mini-Mixtral is built [default: a temp folder].")
    ap.add_argument("--clients", default=None, help="Comma-separated client counts [default: 1,4,8,16].")
    ap.add_argument("--requests", type=int, default=None, help="Requests per client per phase [default: 4].")
    ap.add_argument("--max-tokens", type=int, default=None, help="max_tokens of each request [default: 64].")
    ap.add_argument("--max-batch", type=int, default=16, help="The server's --max-batch.")
    ap.add_argument("--threads", type=int, default=None, help="The server's --threads.")
    ap.add_argument("--memory-run", type=int, default=0, metavar="K", help="Then K requests, RSS at 0, K/2, K.")
    ap.add_argument("--memory-max-tokens", type=int, default=16, help="max_tokens of the memory run's requests.")
    ap.add_argument("--time-limit", type=float, default=1200.0, help="Seconds for the whole benchmark.")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--json", action="store_true", help="Also print the numbers as one JSON object.")
    ap.add_argument("--tiny", action="store_true", help="The tiny model, few clients and tokens (a smoke run).")
    args = ap.parse_args(argv)
    args.clients = [int(c) for c in (args.clients or ("1,2" if args.tiny else "1,4,8,16")).split(",")]
    args.requests = args.requests or (2 if args.tiny else 4)
    args.max_tokens = args.max_tokens or (8 if args.tiny else 64)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    deadline = time.monotonic() + args.time_limit
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        out = args.out or build_export(args.work or Path(tmp), args.tiny)
        port, log = free_port(), Path(tmp) / "server.log"
        base = f"http://{HOST}:{port}"
        proc = start_server(out, port, args, log)
        try:
            wait_ready(proc, base, log, timeout=300)
            report = asyncio.run(measure(base, proc.pid, args, deadline))
        finally:
            report_rc = stop_server(proc)
    report["server_exit"] = report_rc
    report["command"] = "PYTHONPATH=. python tools/bench_serve.py " + " ".join(argv or sys.argv[1:])
    print(table(report["rows"]))
    v = report["verdict"]
    if "ratio_8_over_1" in v:
        print(f"aggregate decode at 8 clients / 1 client: {v['ratio_8_over_1']:.2f}x (target >= 2.5x); "
              f"p99 TTFT at 8 clients: {v['ttft_p99_at_8_s']:.2f} s (target < 2 s)")
    print(f"errors: {v['errors']}, lost requests: {v['lost']}, server exit code: {report_rc}")
    if "memory" in report:
        m = report["memory"]
        print(f"memory run: {m['requests']} requests in {m['wall_s']:.0f} s, {m['errors']} errors; server RSS "
              f"{m['start_mb']:.0f} / {m['middle_mb']:.0f} / {m['end_mb']:.0f} MB (start / middle / end): "
              f"{'flat' if m['flat'] else 'GROWING'}")
    if args.json:
        print(json.dumps(report))
    return 0 if report_rc == 0 else 1


async def measure(base: str, pid: int, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    await run_clients(base, 1, 2, args.max_tokens, args.request_timeout, deadline)  # warm-up
    rows = []
    for n in args.clients:
        results, wall, skipped = await run_clients(base, n, args.requests, args.max_tokens,
                                                   args.request_timeout, deadline)
        rows.append(summarize(n, results, wall, skipped))
        print(f"# {n} clients: {rows[-1]['agg_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    report: dict[str, Any] = {"rows": rows, "verdict": verdict(rows), "max_batch": args.max_batch,
                              "max_tokens": args.max_tokens, "requests_per_client": args.requests}
    if args.memory_run:
        report["memory"] = await memory_run(base, pid, args.memory_run, args.memory_max_tokens,
                                            args.request_timeout, deadline)
    return report


if __name__ == "__main__":
    sys.exit(main())
