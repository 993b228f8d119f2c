"""An adversarial round against the `mixport` command line, as a hostile folder or careless user would.

Each case builds its inputs in a scratch folder, runs `mixport ...` in a subprocess and is scored:
  clean    exit 1 with exactly one `error:` line (or exit 2, click's usage error), no traceback
  accept   exit 0 (the input was harmless or valid)
  FAIL     anything else: a traceback, a crash, a hang (timeout), a leftover staging folder,
           a file touched outside the scratch folder, a marker file a payload tried to create
Prints one line per case and the counts. Run: python tools/attack.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

MIXPORT = [sys.executable, "-m", "mixport.cli"]
TIMEOUT = 300


def tiny(root: Path) -> Path:
    from mixport.exporter.tiny import write_tiny

    return write_tiny(root / "src")


def exported(root: Path) -> Path:
    out = root / "out"
    subprocess.run([*MIXPORT, "export", str(tiny(root)), "-o", str(out), "--no-check"], check=True,
                   capture_output=True, timeout=TIMEOUT)
    return out


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# -- cases: (name, setup(root) -> argv); PWNED in root means a payload ran ---------------------
def chat_template(payload: str) -> Callable[[Path], list[str]]:
    def setup(root: Path) -> list[str]:
        out = exported(root)
        edit_json(out / "tokenizer_config.json", chat_template=payload.replace("ROOT", str(root)))
        return ["run", str(out), "--prompt", "hi", "--chat", "--max-new-tokens", "2"]
    return setup


def config_change(**changes: object) -> Callable[[Path], list[str]]:
    def setup(root: Path) -> list[str]:
        src = tiny(root)
        edit_json(src / "config.json", **changes)
        return ["export", str(src), "-o", str(root / "out"), "--no-check"]
    return setup


def tokenizer_link(root: Path) -> list[str]:
    src = tiny(root)
    (root / "secret.json").write_text('{"secret": true}')
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to(root / "secret.json")
    return ["export", str(src), "-o", str(root / "out"), "--no-check"]


def onnx_location(location: str) -> Callable[[Path], list[str]]:
    def setup(root: Path) -> list[str]:
        import onnx

        out = exported(root)
        (root / "secret.bin").write_bytes(b"\0" * 4096)
        model = onnx.load(str(out / "model.onnx"))
        tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value=location.replace("ROOT", str(root)))
        onnx.save(model, str(root / "evil.onnx"))
        return ["optimize", str(root / "evil.onnx"), "-o", str(root / "opt.onnx")]
    return setup


def header(raw: bytes) -> Callable[[Path], list[str]]:
    def setup(root: Path) -> list[str]:
        src = tiny(root)
        (src / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
        return ["export", str(src), "-o", str(root / "out"), "--no-check"]
    return setup


def out_inside_src(root: Path) -> list[str]:
    src = tiny(root)
    return ["export", str(src), "-o", str(src / "sub"), "--force", "--no-check"]


def out_is_parent(root: Path) -> list[str]:
    src = tiny(root)
    return ["export", str(src), "-o", str(src.parent), "--force", "--no-check"]


def manifest_engine(name: str) -> Callable[[Path], list[str]]:
    def setup(root: Path) -> list[str]:
        out = exported(root)
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["engine"] = {"file": name, "sha256": "0" * 64, "flavor": "tensorrt_rtx", "trt_version": "1.7"}
        (out / "manifest.json").write_text(json.dumps(manifest))
        return ["run", str(out), "--prompt", "hi", "--max-new-tokens", "2", "--backend", "tensorrt"]
    return setup


def run_args(*args: str) -> Callable[[Path], list[str]]:
    def setup(root: Path) -> list[str]:
        return ["run", str(exported(root)), *args]
    return setup


def check_args(*args: str) -> Callable[[Path], list[str]]:
    def setup(root: Path) -> list[str]:
        out = exported(root)
        return ["check", str(out), *[a.replace("ROOT", str(root)) for a in args]]
    return setup


CASES: list[tuple[str, Callable[[Path], list[str]]]] = [
    ("template: os via globals", chat_template("{{ cycler.__init__.__globals__.os.system('touch ROOT/PWNED') }}")),
    ("template: mro walk", chat_template("{{ ''.__class__.__mro__[1].__subclasses__() }}")),
    ("template: joiner globals", chat_template("{{ joiner.__init__.__globals__ }}")),
    ("template: huge range", chat_template("{% for i in range(10**12) %}x{% endfor %}")),
    ("template: string bomb", chat_template("{{ 'a' * 10**11 }}")),
    ("template: raise", chat_template("{{ raise_exception('nope') }}")),
    ("template: not jinja", chat_template("{% for %}")),
    ("config: vocab 2**40", config_change(vocab_size=2**40)),
    ("config: top-k 0", config_change(num_experts_per_tok=0)),
    ("config: experts -1", config_change(num_local_experts=-1)),
    ("config: rope_theta inf", config_change(rope_theta=float("inf"))),
    ("config: eps 0", config_change(rms_norm_eps=0)),
    ("config: eos outside vocab", config_change(eos_token_id=10**9)),
    ("config: architectures dict", config_change(architectures={"a": 1})),
    ("config: rope_scaling yarn", config_change(rope_scaling={"type": "yarn", "factor": 4})),
    ("config: window 0", config_change(sliding_window=0)),
    ("tokenizer.json links out", tokenizer_link),
    ("onnx location ../secret.bin", onnx_location("../secret.bin")),
    ("onnx location absolute", onnx_location("ROOT/secret.bin")),
    ("onnx location /proc/self/environ", onnx_location("/proc/self/environ")),
    ("safetensors header 'null'", header(b"null")),
    ("safetensors header negative shape", header(json.dumps(
        {"lm_head.weight": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}).encode() + b"\0" * 16)),
    ("safetensors header huge length", header(b"{}" + b" " * 6)),
    ("export -o inside SRC --force", out_inside_src),
    ("export -o parent of SRC --force", out_is_parent),
    ("manifest engine /etc/passwd", manifest_engine("/etc/passwd")),
    ("manifest engine ../x.engine", manifest_engine("../x.engine")),
    ("run --seed 2**65", run_args("--prompt", "a", "--temperature", "1", "--seed", str(2**65))),
    ("run --threads 999", run_args("--prompt", "a", "--threads", "999")),
    ("run --top-p nan", run_args("--prompt", "a", "--temperature", "1", "--top-p", "nan")),
    ("run ids out of vocab", run_args("--prompt", "0 1 99999999999")),
    ("run --max-new-tokens 10**9", run_args("--prompt", "a", "--max-new-tokens", str(10**9))),
    ("run --prompts-file missing", run_args("--prompts-file", "/nonexistent/p.txt")),
    ("check --steps 10**6", check_args("--steps", str(10**6))),
    ("check --onnx garbage", check_args("--onnx", "ROOT/src/config.json")),
]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def score(root: Path, argv: list[str], outside: Path, before: dict[str, tuple[int, int]]) -> tuple[str, str]:
    try:
        done = subprocess.run([*MIXPORT, *argv], capture_output=True, text=True, timeout=TIMEOUT,
                              cwd=root, env={**os.environ, "HOME": str(root)})
    except subprocess.TimeoutExpired:
        return "FAIL", f"hung past {TIMEOUT} s"
    text = done.stdout + done.stderr
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    leftovers = [p.name for p in root.rglob(".*tmp-*")]
    if (root / "PWNED").exists():
        return "FAIL", "a template payload ran"
    if "Traceback" in text or done.returncode < 0:
        return "FAIL", f"rc {done.returncode}: {text.strip().splitlines()[-1:] if text.strip() else ''}"
    if leftovers:
        return "FAIL", f"left {leftovers}"
    if snapshot(outside) != before:
        return "FAIL", "a file outside the scratch folder changed"
    if done.returncode == 0:
        return "accept", "exit 0"
    if done.returncode == 1 and len(errors) == 1:
        return "clean", errors[0][:150]
    if done.returncode == 2 and "Usage:" in text:
        return "clean", "usage: " + text.strip().splitlines()[-1][:140]
    return "FAIL", f"rc {done.returncode}: {text.strip()[-200:]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, default=None, help="Scratch folders here (kept) instead of a temp dir.")
    ap.add_argument("-k", default="", help="Only cases whose name contains this.")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="mixport-attack-"))
    outside = base / "outside"  # a folder every case could reach and none may touch
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "keep.txt").write_text("keep")
    counts: Counter[str] = Counter()
    for i, (name, setup) in enumerate(CASES):
        if args.k not in name:
            continue
        root = base / f"case{i:02d}"
        root.mkdir()
        argv = setup(root)
        before = snapshot(outside)
        verdict, detail = score(root, argv, outside, before)
        counts[verdict] += 1
        print(f"{verdict:6s} {name}: {detail}", flush=True)
    print(f"\n{sum(counts.values())} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if args.keep is None:
        shutil.rmtree(base, ignore_errors=True)
    sys.exit(1 if counts["FAIL"] else 0)


if __name__ == "__main__":
    main()
