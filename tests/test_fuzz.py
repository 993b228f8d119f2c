"""Property-based attacks within a fixed example budget: config.json, safetensors headers, CLI options.

For every generated input the command either succeeds (exit 0), or fails with exactly one
`error:` line (exit 1), or is a usage error (exit 2, click's message); never a traceback, never a
file touched outside the scratch folder, never a change to the source folder. The examples are
derandomized: CI runs the same ones every time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mixport.exporter.tiny import write_tiny
from tests.helpers import invoke, one_line_error, require_module

hypothesis = require_module("hypothesis")
st = hypothesis.strategies

# No shrinking: a failure is reported as generated (shrinking re-runs exports for minutes).
SETTINGS = hypothesis.settings(max_examples=25, deadline=None, derandomize=True, database=None,
                               suppress_health_check=list(hypothesis.HealthCheck),
                               phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])

JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63),
    st.sampled_from([0, 1, 2, -1, 3, 7, 16, 2**31, 2**40]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["2", "abc", "", "mixtral", "MixtralForCausalLM", "default", "yarn", "NaN"]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=6)
EXTRA_KEYS = ["rope_parameters", "rope_scaling", "architectures", "model_type", "sliding_window",
              "max_position_embeddings", "head_dim", "num_key_value_heads", "tie_word_embeddings",
              "eos_token_id", "bos_token_id", "pad_token_id", "rms_norm_eps", "rope_theta"]


def tree_state(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ROOT (the scratch folder SKIP left out)."""
    state = {}
    for path in root.rglob("*"):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        if path.is_file() and not path.is_symlink():
            st_ = path.stat()
            state[str(path)] = (st_.st_size, st_.st_mtime_ns)
    return state


def folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def assert_contract(result: Any) -> None:
    """Exit 0; or one `error:` line, exit 1; or a click usage error, exit 2. Never a traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"uncaught {type(result.exception).__name__}: {result.exception}\n{result.output}"
    assert "Traceback" not in result.output, result.output
    if result.exit_code == 1:
        one_line_error(result)
    elif result.exit_code == 2:
        assert "Usage:" in result.output and "Error" in result.output, result.output
    else:
        assert result.exit_code == 0, result.output


class Scratch:
    """One example's scratch folder inside the test's tmp folder; on exit, nothing outside it (in
    the whole pytest temp tree) may have changed, and the source folder must be byte-identical."""

    def __init__(self, root: Path, watched: Path, source: Path) -> None:
        self.root, self.watched, self.source = root, watched, source
        self.count = 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[Path]:
        self.count += 1
        scratch = self.root / f"ex{self.count}"
        scratch.mkdir()
        before, digest = tree_state(self.watched, skip=scratch), folder_digest(self.source)
        try:
            yield scratch
        finally:
            after = tree_state(self.watched, skip=scratch)
            shutil.rmtree(scratch, ignore_errors=True)
        assert after == before, f"files outside the scratch folder changed: {set(after) ^ set(before)}"
        assert folder_digest(self.source) == digest, "the source folder changed"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("fuzz-src"))


@pytest.fixture
def scratch(source: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Scratch:
    return Scratch(tmp_path, tmp_path_factory.getbasetemp(), source)


def _mutated(base: dict[str, Any], key: str, value: Any, delete: bool) -> dict[str, Any]:
    raw = dict(base)
    if delete:
        raw.pop(key, None)
    else:
        raw[key] = value
    return raw


@pytest.mark.slow
def test_fuzz_config_json(source: Path, scratch: Scratch) -> None:
    """A tiny folder whose config.json has one field replaced by any JSON value, or dropped."""
    base = json.loads((source / "config.json").read_text())
    keys = sorted(set(base) | set(EXTRA_KEYS))

    @SETTINGS
    @hypothesis.given(key=st.sampled_from(keys), value=JSON_VALUES, delete=st.booleans())
    def check(key: str, value: Any, delete: bool) -> None:
        with scratch() as work:
            folder = work / "src"
            shutil.copytree(source, folder)
            (folder / "config.json").write_text(json.dumps(_mutated(base, key, value, delete)))
            result = invoke("export", folder, "-o", work / "out", "--no-fuse", "--no-check")
            assert_contract(result)
            assert result.exit_code != 2, result.output  # a bad config is a bad input, not a usage error
            leftovers = [p.name for p in work.iterdir() if p.name.startswith(".")]
            assert not leftovers, f"staging left behind: {leftovers}"
            if result.exit_code:
                assert not (work / "out").exists()

    check()


SAFETENSORS_DTYPES = ["F32", "F16", "BF16", "I64", "BOOL", "F64", "U8", "X9", "", "f32"]
TENSOR_ENTRY = st.one_of(
    st.fixed_dictionaries({
        "dtype": st.sampled_from(SAFETENSORS_DTYPES),
        "shape": st.lists(st.integers(min_value=-2, max_value=70), max_size=3),
        "data_offsets": st.one_of(st.lists(st.integers(min_value=-8, max_value=600), min_size=0, max_size=3),
                                  JSON_SCALARS)}),
    JSON_VALUES)
HEADERS = st.one_of(
    st.dictionaries(st.sampled_from(["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                                     "__metadata__", "x"]), TENSOR_ENTRY, max_size=4),
    JSON_VALUES)


def test_fuzz_safetensors_header(source: Path, scratch: Scratch) -> None:
    """model.safetensors with any header (and some data bytes): refused with one line, or exported."""

    @SETTINGS
    @hypothesis.given(header=HEADERS, data=st.binary(max_size=600), declared=st.integers(-4, 40))
    def check(header: Any, data: bytes, declared: int) -> None:
        with scratch() as work:
            folder = work / "src"
            shutil.copytree(source, folder)
            body = json.dumps(header).encode()
            length = len(body) + declared if declared > 8 else len(body)  # sometimes lie about the length
            (folder / "model.safetensors").write_bytes(struct.pack("<Q", max(length, 0)) + body + data)
            result = invoke("export", folder, "-o", work / "out", "--no-fuse", "--no-check")
            assert_contract(result)
            assert result.exit_code == 1, result.output  # never the tiny model's weights

    check()


@pytest.fixture(scope="module")
def export_dir(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mixport.exporter.export import export

    out = tmp_path_factory.mktemp("fuzz-export") / "out"
    export(source, out)
    return out


FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1.0, 2.0]))
INTS = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.integers(min_value=-2, max_value=6))


SANE = {"temperature": [0.0, 0.5, 1.0], "top_k": [0, 1, 5, 50], "top_p": [1.0, 0.9, 0.5], "seed": [0, 1, 12345],
        "new": [1, 3, 6], "threads": [1, 2], "stop": ["e", " ", "ship"]}
WEIRD = {"temperature": FLOATS, "top_k": INTS, "top_p": FLOATS, "seed": INTS, "new": INTS, "threads": INTS,
         "stop": st.text(max_size=3)}
FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "seed": "--seed",
         "new": "--max-new-tokens", "threads": "--threads", "stop": "--stop"}


@st.composite
def run_options(draw: Any) -> dict[str, Any]:
    """Each option left out or given a sane value; then at most one option given any value at all."""
    options = {key: draw(st.one_of(st.none(), st.sampled_from(values))) for key, values in SANE.items()}
    odd = draw(st.sampled_from([None, *SANE]))
    if odd is not None:
        options[odd] = draw(WEIRD[odd])
    return options


def test_fuzz_run_options(export_dir: Path, scratch: Scratch) -> None:
    """`mixport run` with sane and insane option values and prompts: one line, a usage error, or text."""

    @SETTINGS
    @hypothesis.given(options=run_options(),
                      prompt=st.sampled_from(["The ship", "", " ", "-5 3", "1 2 3", "\x00\x1b[2J", "999999"]))
    def check(prompt: str, options: dict[str, Any]) -> None:
        with scratch() as work:
            folder = work / "export"
            shutil.copytree(export_dir, folder)
            if options["new"] is not None:
                options["new"] = min(options["new"], 6)
            args: list[object] = ["run", folder, "--prompt", prompt, "--no-stream"]
            for key, value in options.items():
                if value is not None:
                    args += [FLAGS[key], value]
            result = invoke(*args)
            assert_contract(result)
            temperature = options["temperature"]
            if result.exit_code == 0:  # accepted values are sane ones
                assert temperature is None or (math.isfinite(temperature) and temperature >= 0), result.output
                assert prompt.strip(), result.output

    check()
