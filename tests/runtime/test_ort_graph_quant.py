"""The fast ONNX Runtime graph of a quantized export: it computes what the portable model.onnx
computes, points at model.onnx's weights (QMoE's inputs: in its own file, in QMoE's layouts), and
runs its quantized MatMuls as MatMulNBits and its experts as QMoE (where QMoE can: int4 here has
blocks of 64 over F = 96, a partial block, so its experts run the sparse body of MatMulNBits; int8 and
int4-zp run QMoE).

Parity is exact (<= 1e-4) for a graph built at accuracy level 1 (fp32 activations; 8-bit experts then
keep the sparse body) against the portable model with the same level. At the level ``mixport run``
uses (``QUANT_ACCURACY_LEVEL`` 4: int8 activations inside MatMulNBits / QMoE), max |logit error| vs the
exact model on this tiny model, prefill of 2 x 11 + 6 steps decoding the same tokens: about 0.06
(int8), 0.07 (int4), 0.5 (int4-zp); the test holds it under 1 (``LEVEL4_BOUND``): the error against
the float model is ``mixport check``'s business."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from mixport import artifact
from mixport.runtime import load, ort_graph, ort_qmoe
from mixport.runtime.onnx_locate import locate
from mixport.runtime.ort_fast import OrtFastSession
from mixport.runtime.ort_session import ACCURACY_CONFIG, QUANT_ACCURACY_LEVEL, OrtSession, portable_config, quant_config
from tests.conftest import QUANT_SCHEMES
from tests.exporter.parity import Greedy, SessionStepper, greedy, left_padded_prompt, max_logit_error

EXACT_LEVEL = 1
LEVEL4_BOUND = 1.0


@pytest.fixture(scope="module")
def fast_folders(quantized_export: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
                 ) -> Callable[[str], Path]:
    """A copy of each quantized export with its fast graph built (as `mixport run` builds it)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            folder = Path(shutil.copytree(quantized_export(name), tmp_path_factory.mktemp(name) / "q"))
            ort_graph.ensure(folder, artifact.Manifest.read(folder))
            made[name] = folder
        return made[name]

    return get


def _run(session: object, vocab: int, forced: np.ndarray | None = None) -> Greedy:
    """Prefill of a left-padded batch of 2 and 6 greedy steps (decoding ``forced`` when given)."""
    ids, mask = left_padded_prompt(vocab)
    return greedy(SessionStepper(session), ids, mask, 6, forced)


@pytest.mark.parametrize("name", list(QUANT_SCHEMES))
def test_fast_graph_equals_the_portable_model(name: str, fast_folders: Callable[[str], Path]) -> None:
    folder = fast_folders(name)
    manifest = artifact.Manifest.read(folder)
    vocab = manifest.config["vocab_size"]
    want = _run(OrtSession(folder / artifact.MODEL_FILE, manifest, threads=1, accuracy_level=EXACT_LEVEL), vocab)
    exact = folder / "exact.ort.onnx"  # beside model.onnx: its weights point there
    weights = ort_graph.export_weights(folder / artifact.MODEL_FILE, manifest.config)
    ort_graph._save(ort_graph.build(weights, manifest.config, manifest.dtype, share=True,
                                    accuracy_level=EXACT_LEVEL), exact)
    got = _run(OrtFastSession(exact, manifest, threads=1, accuracy_level=EXACT_LEVEL), vocab)
    fast = folder / ort_graph.FILE
    _, mask = left_padded_prompt(vocab)
    assert np.array_equal(got.tokens, want.tokens)
    assert max_logit_error(got, want, mask) <= 1e-4
    # the exact model's picks decoded, so that both read the same tokens
    chosen = _run(OrtFastSession(fast, manifest, threads=1), vocab, want.tokens)  # QUANT_ACCURACY_LEVEL
    assert 0 < max_logit_error(chosen, want, mask) <= LEVEL4_BOUND  # int8 activations change the numbers


@pytest.mark.parametrize("name", list(QUANT_SCHEMES))
def test_fast_graph_points_at_model_onnx_and_its_qmoe_file(name: str, fast_folders: Callable[[str], Path]) -> None:
    """Expert slabs (sparse body) and single quantized weights read model.onnx's bytes (external data
    there); QMoE's weights, scales and zero points are in ``ort_qmoe.PARTS``, in QMoE's layouts, each
    where its recipe says: the graph itself is a small file."""
    folder = fast_folders(name)
    fast = onnx.load(str(folder / ort_graph.FILE), load_external_data=False)
    cfg = artifact.Manifest.read(folder).config
    pointers = {t.name for t in fast.graph.initializer if onnx.external_data_helper.uses_external_data(t)}
    where = {t.name: {e.key: e.value for e in t.external_data} for t in fast.graph.initializer if t.name in pointers}
    recipes = ort_qmoe.parts_of(fast)
    qmoe = [n for n in fast.graph.node if n.op_type == "QMoE"]
    if name == "int4":  # blocks of 64 over F = 96: QMoE cannot, the sparse body points at each slab
        assert not qmoe and not recipes and not (folder / ort_qmoe.PARTS).exists()
        slabs = [n for n in pointers if ".experts." in n and n.endswith("_quantized")]
        assert len(slabs) == cfg["num_hidden_layers"] * cfg["num_local_experts"] * 2  # gate|up and down
    else:
        assert len(qmoe) == cfg["num_hidden_layers"]
        assert {n for n, w in where.items() if w["location"] == ort_qmoe.PARTS} == set(recipes)
        assert all(int(where[n]["offset"]) == r["offset"] and int(where[n]["length"]) == r["bytes"]
                   and r["offset"] % ort_qmoe.ALIGN == 0 for n, r in recipes.items())
        assert Counter(r["part"] for r in recipes.values()) == Counter(
            {"weights": 2 * cfg["num_hidden_layers"], "scales": 2 * cfg["num_hidden_layers"],
             **({"zero_points": 2 * cfg["num_hidden_layers"]} if name == "int4-zp" else {})})
        assert ort_qmoe.parts_ready(folder, recipes)
        assert (folder / ort_qmoe.PARTS).stat().st_size == ort_qmoe.parts_size(recipes)
    assert {w["location"] for w in where.values()} <= {artifact.MODEL_FILE, ort_qmoe.PARTS}
    assert {"embed_tokens.weight", "lm_head.weight"} <= pointers
    size = (folder / ort_graph.FILE).stat().st_size
    assert size < (folder / artifact.MODEL_FILE).stat().st_size / 3


def test_a_plain_session_reads_the_same_graph_from_its_files(fast_folders: Callable[[str], Path]) -> None:
    """Nothing is made at load: ONNX Runtime alone, reading QMoE's inputs from the file instead of the
    memory maps OrtFastSession hands it, computes the same logits."""
    folder = fast_folders("int4-zp")
    manifest = artifact.Manifest.read(folder)
    fast, vocab = OrtFastSession(folder / ort_graph.FILE, manifest, threads=1), manifest.config["vocab_size"]
    want = _run(fast, vocab)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    for key, value in quant_config(manifest).items():
        opts.add_session_config_entry(key, value)
    plain = ort.InferenceSession(str(folder / ort_graph.FILE), opts, providers=["CPUExecutionProvider"])
    fast.sess = plain  # the same binding code around a session that read every weight itself
    fast.io = plain.io_binding()
    got = _run(fast, vocab, want.tokens)
    assert np.array_equal(got.tokens, want.tokens)
    _, mask = left_padded_prompt(vocab)
    assert max_logit_error(got, want, mask) == 0


def test_quantized_matmuls_become_matmulnbits(fast_folders: Callable[[str], Path], tmp_path: Path) -> None:
    """ONNX Runtime fuses each DequantizeLinear -> MatMul of the fast graph into one MatMulNBits
    (else the weights would be dequantized at every step); the accuracy level is the session's."""
    folder = fast_folders("int4")
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.add_session_config_entry(ACCURACY_CONFIG, str(QUANT_ACCURACY_LEVEL))
    ort.InferenceSession(str(folder / ort_graph.FILE), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in optimized.graph.node)
    cfg = artifact.Manifest.read(folder).config
    assert ops["DequantizeLinear"] == 0
    # per layer: q|k|v, o, and gate|up + down of each expert
    assert ops["MatMulNBits"] == cfg["num_hidden_layers"] * (2 + 2 * cfg["num_local_experts"])
    levels = {a.i for n in optimized.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels == {QUANT_ACCURACY_LEVEL}


def test_the_portable_session_dequantizes_once(fast_folders: Callable[[str], Path], tmp_path: Path) -> None:
    """model.onnx of a quantized folder in ``OrtSession``: every DequantizeLinear folded into float
    weights when the session starts (the MoE body's whole-stack dequantization would otherwise run
    at every step: 1.2 tok/s on the mini-Mixtral), and the numbers are the exact model's."""
    folder = fast_folders("int4-zp")
    manifest = artifact.Manifest.read(folder)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    for key, value in portable_config(manifest).items():
        opts.add_session_config_entry(key, value)
    ort.InferenceSession(str(folder / artifact.MODEL_FILE), opts, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node)
    assert ops["DequantizeLinear"] == 0 and ops["MatMulNBits"] == 0
    vocab = manifest.config["vocab_size"]
    want = _run(OrtSession(folder / artifact.MODEL_FILE, manifest, threads=1, accuracy_level=EXACT_LEVEL), vocab)
    got = _run(OrtSession(folder / artifact.MODEL_FILE, manifest, threads=1), vocab)
    assert max_logit_error(got, want, left_padded_prompt(vocab)[1]) <= 1e-4


def test_qmoe_layers_in_the_optimized_graph(fast_folders: Callable[[str], Path], tmp_path: Path) -> None:
    folder = fast_folders("int4-zp")
    manifest = artifact.Manifest.read(folder)
    session = OrtFastSession(folder / ort_graph.FILE, manifest, threads=1)  # supplies the placeholders
    assert session.sess is not None
    fast = onnx.load(str(folder / ort_graph.FILE), load_external_data=False)
    ops = Counter(n.op_type for n in fast.graph.node)
    assert ops["QMoE"] == manifest.config["num_hidden_layers"]
    assert ops["DequantizeLinear"] == 2 * manifest.config["num_hidden_layers"]  # q|k|v and o


def test_run_uses_the_fast_graph_on_a_quantized_folder(fast_folders: Callable[[str], Path]) -> None:
    said: list[str] = []
    with load(fast_folders("int8"), threads=1, graph="auto", progress=said.append) as pipe:
        assert isinstance(pipe.session, OrtFastSession) and pipe.graph == "fast", said


def test_locate_finds_every_inline_tensor(quantized_export: Callable[[str], Path]) -> None:
    path = quantized_export("int4") / artifact.MODEL_FILE
    data = path.read_bytes()
    where = locate(path)
    proto = onnx.load(str(path))
    inline = [t for t in proto.graph.initializer if t.raw_data]
    assert inline and all(data[where[t.name].offset:where[t.name].offset + where[t.name].length] == t.raw_data
                          for t in inline)
    assert {w.location for w in where.values()} == {artifact.MODEL_FILE}


def test_fp16_experts_run_qmoe_in_fp32(tiny_dir: Path, tmp_path: Path) -> None:
    """An fp16 export's QMoE runs in fp32 between two Casts, with fp32 scales in model.ort.onnx.qmoe
    (QMoE's fp16 kernel would keep an fp32 copy of every scale beside its packed weights), given to
    ONNX Runtime in place from a memory map; greedy tokens equal the portable fp16 model's."""
    from mixport import quant
    from mixport.exporter.export import export
    from mixport.passes import QuantOptions

    bits, block, symmetric = QUANT_SCHEMES["int8"]
    folder = tmp_path / "out"
    export(tiny_dir, folder, dtype="fp16", quantize=QuantOptions(quant.Scheme(bits, block, symmetric)))
    manifest = artifact.Manifest.read(folder)
    fast = ort_graph.ensure(folder, manifest)
    proto = onnx.load(str(fast), load_external_data=False)
    qmoe = [n for n in proto.graph.node if n.op_type == "QMoE"]
    assert len(qmoe) == manifest.config["num_hidden_layers"]
    kinds = {t.name: t.data_type for t in proto.graph.initializer}
    assert {kinds[n.input[3]] for n in qmoe} == {onnx.TensorProto.FLOAT}  # fc1 scales
    made = {n.output[0]: n for n in proto.graph.node}
    assert all(made[n.input[0]].op_type == "Cast" for n in qmoe)
    session = OrtFastSession(fast, manifest, threads=1)
    assert session.shared and all(isinstance(v, np.memmap) for v in session.shared.values())
    vocab = manifest.config["vocab_size"]
    want = _run(OrtSession(folder / artifact.MODEL_FILE, manifest, threads=1), vocab)
    got = _run(session, vocab, want.tokens)
    _, mask = left_padded_prompt(vocab)
    assert max_logit_error(got, want, mask) <= LEVEL4_BOUND


def _resident_kib(path: Path) -> int | None:
    """Rss (KiB) of this process's mappings of PATH (/proc/self/smaps), None where it has none."""
    found, total, current = False, 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's first line (the file, if any, last)
            current = len(head) >= 6 and head[5] == str(path)
            found |= current
        elif current and line.startswith("Rss:"):
            total += int(head[1])
    return total if found else None


def _resident_pages(path: Path) -> set[int] | None:
    """The pages of PATH (their offsets in the file / 4096) this process's mappings of it have resident
    (/proc/self/maps and /proc/self/pagemap's present bit), None where it has no mapping of it."""
    page, found, pages = 4096, False, set()
    with Path("/proc/self/pagemap").open("rb") as pagemap:
        for line in Path("/proc/self/maps").read_text().splitlines():
            head = line.split()
            if len(head) < 6 or head[5] != str(path):
                continue
            found = True
            start, end = (int(x, 16) for x in head[0].split("-"))
            pagemap.seek(start // page * 8)
            entries = np.frombuffer(pagemap.read((end - start) // page * 8), np.uint64)
            first = int(head[2], 16) // page  # the mapping's offset in the file
            pages |= {first + int(i) for i in np.flatnonzero(entries >> np.uint64(63))}
    return pages if found else None


@pytest.mark.skipif(not Path("/proc/self/pagemap").is_file(), reason="needs Linux /proc")
@pytest.mark.parametrize("name", ["int8", "int4-zp"])
def test_qmoe_inputs_are_mapped_and_leave_the_process(name: str, fast_folders: Callable[[str], Path]) -> None:
    """QMoE's weights, scales and zero points reach ONNX Runtime in place from model.ort.onnx.qmoe (no
    anonymous copy, nothing made at load) and, once the session packed them, their pages leave this
    process; decoding never reads a weight again (nor, without zero points, a scale: with them QMoE's
    CPU kernel reads the zero points, and on some runs the scales, in place from the file); the
    session still computes what it did."""
    folder = fast_folders(name)
    manifest = artifact.Manifest.read(folder)
    session = OrtFastSession(folder / ort_graph.FILE, manifest, threads=1)
    parts = (folder / ort_qmoe.PARTS).resolve()
    recipes = ort_qmoe.parts_of(onnx.load(str(folder / ort_graph.FILE), load_external_data=False))
    zero_points = 2 * manifest.config["num_hidden_layers"] if name == "int4-zp" else 0  # fc1, fc2 a layer
    assert Counter(r["part"] for r in recipes.values())["zero_points"] == zero_points
    packed = {p for r in recipes.values() if r["part"] == "weights" or (r["part"] == "scales" and not zero_points)
              for p in range(r["offset"] // 4096, -(-(r["offset"] + r["bytes"]) // 4096))}
    assert len(packed) * 4096 >= sum(r["bytes"] for r in recipes.values() if r["part"] == "weights")
    assert set(session.shared) == set(recipes)  # every part handed over in place, nothing made at load
    assert _resident_pages(parts) == set()  # mapped, none of it resident
    vocab = manifest.config["vocab_size"]
    first = _run(session, vocab)
    assert not _resident_pages(parts) & packed  # decoding reads none of them again
    again = _run(OrtFastSession(folder / ort_graph.FILE, manifest, threads=1), vocab)
    assert np.array_equal(first.tokens, again.tokens)


def test_a_version_7_graph_is_rebuilt_and_its_scales_file_removed(fast_folders: Callable[[str], Path],
                                                                   tmp_path: Path) -> None:
    """A folder whose manifest records a version-7 fast graph (QMoE's scales in model.ort.onnx.scales,
    its weights made at load) gets the current graph on its next run, and the scales file that graph
    wrote goes; a file of that name the manifest does not vouch for is never deleted."""
    import dataclasses

    for recorded in (7, None):
        folder = Path(shutil.copytree(fast_folders("int8"), tmp_path / f"v{recorded}"))
        manifest = artifact.Manifest.read(folder)
        old = None if recorded is None else dataclasses.replace(manifest.ort_graph, version=recorded)
        dataclasses.replace(manifest, ort_graph=old).write(folder)
        (folder / ort_qmoe.PARTS).unlink()
        (folder / ort_qmoe.OLD_PARTS).write_bytes(b"old scales")
        fast = ort_graph.ensure(folder, artifact.Manifest.read(folder))
        assert artifact.Manifest.read(folder).ort_graph.version == ort_graph.GRAPH_VERSION
        assert ort_qmoe.parts_ready(folder, ort_qmoe.parts_of(onnx.load(str(fast), load_external_data=False)))
        assert (folder / ort_qmoe.OLD_PARTS).exists() == (recorded is None)
