"""The quantization benchmark's peers: llama.cpp (llama-cpp-python) f32 / q8_0 / q4_0 and ONNX Runtime
GenAI int4 (its model builder's QMoE), each made from the same HF folder, timed and compared on the
same tokens. A peer that cannot run returns a row that says why.

* llama.cpp: ``convert_hf_to_gguf.py`` from llama-cpp-python's source distribution (its
  ``vendor/llama.cpp``) writes the f32 GGUF; ``llama_cpp.llama_model_quantize`` makes q8_0 / q4_0
  from it (llama.cpp's own choices per tensor: the router stays f32). The mini-Mixtral's test
  tokenizer is a 512-token byte-level BPE that the converter's pre-tokenizer table does not know
  and that has no sentencepiece model: the converter is run with the GPT-2 BPE vocab path and the
  "default" pre-tokenizer (token ids are fed directly; the text tokenizer is never used).
* ORT-GenAI: ``tools/ortgenai_mixtral.py`` (its builder with a Mixtral class; 0.18 has none) with
  ``-p int4 -e cpu``; run through ``onnxruntime_genai``'s Generator, greedy, no early stop.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from quant_common import Plan, Prepared, logit_errors, run_child, size_mb, tail, warm_up
from quant_table import LLAMA_F32, LLAMA_Q4, LLAMA_Q8, ORTGENAI_INT4, Row

HERE = Path(__file__).resolve().parent
CONVERT = """
import sys
sys.path.insert(0, sys.argv[1])
sys.argv = ["convert_hf_to_gguf.py", sys.argv[2], "--outtype", "f32", "--outfile", sys.argv[3]]
import convert_hf_to_gguf as convert
from conversion.base import TextModel
from conversion.llama import LlamaModel
LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2()  # no sentencepiece model in the test folder
TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"  # its BPE is not in the hash table
convert.main()
"""
FTYPES = {LLAMA_Q8: "LLAMA_FTYPE_MOSTLY_Q8_0", LLAMA_Q4: "LLAMA_FTYPE_MOSTLY_Q4_0"}


def llama_source(work: Path, given: Path | None) -> tuple[Path | None, str]:
    """The llama.cpp tree with convert_hf_to_gguf.py: GIVEN, or llama-cpp-python's sdist (the installed
    version) unpacked under WORK, downloaded with pip when absent."""
    if given is not None:
        return (given, "") if (given / "convert_hf_to_gguf.py").is_file() else (None, f"no converter in {given}")
    try:
        import llama_cpp
    except ImportError as exc:
        return None, f"llama-cpp-python is not installed ({exc}); pip install llama-cpp-python"
    tree = work / f"llama_cpp_python-{llama_cpp.__version__}" / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree, ""
    sdist = work / f"llama_cpp_python-{llama_cpp.__version__}.tar.gz"
    if not sdist.is_file():
        code = run_child([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={llama_cpp.__version__}",
                             "--no-binary", ":all:", "--no-deps", "-d", str(work)], work / "pip-download.log")
        if code != 0 or not sdist.is_file():
            return None, f"pip download of the sdist failed: {tail(work / 'pip-download.log')}"
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    return (tree, "") if (tree / "convert_hf_to_gguf.py").is_file() else (None, f"no converter in {sdist}")


def make_gguf(src: Path, work: Path, name: str, f32: Path, llama_src: Path | None,
              threads: int) -> tuple[Path | None, str]:
    """The GGUF for NAME (reused when present): f32 by the converter, q8_0 / q4_0 quantized from it."""
    import llama_cpp

    if name == LLAMA_F32:
        if f32.is_file():
            return f32, ""
        tree, why = llama_source(work, llama_src)
        if tree is None:
            return None, why
        code = run_child([sys.executable, "-c", CONVERT, str(tree), str(src), str(f32)], work / "convert.log")
        return (f32, "") if code == 0 else (None, f"convert_hf_to_gguf.py exited {code}: {tail(work / 'convert.log')}")
    out = work / f"mini-{name.split()[-1]}.gguf"
    if out.is_file():
        return out, ""
    if not f32.is_file():
        return None, "no f32 GGUF to quantize (see the llama.cpp f32 row)"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[name])
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params)
    return (out, "") if code == 0 else (None, f"llama_model_quantize returned {code}")


def gguf_types(tree: Path | None, path: Path) -> str:
    """What llama.cpp stored per tensor type, e.g. "q4_0 x33, q6_K x1, f32 x9" (gguf-py from TREE)."""
    if tree is None or not (tree / "gguf-py").is_dir():
        return ""
    sys.path.insert(0, str(tree / "gguf-py"))
    from gguf import GGUFReader

    counts = Counter(t.tensor_type.name.lower() for t in GGUFReader(str(path)).tensors)
    return "tensors " + ", ".join(f"{k} x{v}" for k, v in counts.most_common())


def _llama(path: Path, plan: Plan, logits_all: bool):  # -> llama_cpp.Llama
    from llama_cpp import Llama

    n_ctx = max(plan.prompt_len + plan.new_tokens, plan.error_len) + 8
    return Llama(str(path), n_ctx=n_ctx, n_batch=512, n_threads=plan.threads, n_threads_batch=plan.threads,
                 logits_all=logits_all, verbose=False)


def _llama_time(llm, plan: Plan) -> tuple[float, float]:  # noqa: ANN001
    """(prefill s, decode s): the prompt in one batch, then new_tokens - 1 greedy steps."""
    import llama_cpp

    def last() -> int:
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        return int(row.argmax())

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(plan.prompt)
    nxt = last()
    t1 = time.perf_counter()
    for _ in range(plan.new_tokens - 1):
        llm.eval([nxt])
        nxt = last()
    return t1 - t0, time.perf_counter() - t1


def llama_variant(name: str, src: Path, work: Path, plan: Plan, ref: np.ndarray,
                  llama_src: Path | None) -> tuple[Row, Prepared | None]:
    """llama.cpp at one precision: GGUF made (or reused), logits with logits_all, then a timer."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return Row(name, why=f"llama-cpp-python is not installed ({exc})"), None
    path, why = make_gguf(src, work, name, work / "mini-f32.gguf", llama_src, plan.threads)
    if path is None:
        print(f"# {name}: {why}", file=sys.stderr)
        return Row(name, why=why), None
    row = Row(name, size_mb=size_mb(path))
    row.notes.append(gguf_types(llama_source(work, llama_src)[0], path) or "tensor types: gguf-py not found")
    checker = _llama(path, plan, logits_all=True)
    checker.eval(plan.error_tokens)
    logits = np.array(checker.scores[: plan.error_len], dtype=np.float32)
    checker.close()
    row.set_errors(logit_errors(ref, logits))
    llm = _llama(path, plan, logits_all=False)
    _llama_time(llm, warm_up(plan))
    return row, Prepared(lambda: _llama_time(llm, plan), logits, llm.close)


def build_ortgenai(src: Path, out: Path, options: list[str]) -> str:
    """ORT-GenAI's builder, int4 for the CPU, with builder extra OPTIONS (KEY=VALUE; none: its defaults);
    reused when OUT holds a model; "" or why not."""
    if (out / "genai_config.json").is_file():
        return ""
    log = out.parent / f"{out.name}.build.log"
    code = run_child([sys.executable, str(HERE / "ortgenai_mixtral.py"), str(src), str(out),
                         "--precision", "int4", "--ep", "cpu", "--extra", *options], log)
    return "" if code == 0 else f"the model builder exited {code}: {tail(log)}"


def onnx_ops(model: Path) -> str:
    """The quantized ops ORT-GenAI's builder wrote, with their bits / block sizes."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    seen: Counter[str] = Counter()
    for node in graph.node:
        if node.op_type in ("QMoE", "MoE", "MatMulNBits", "MatMul"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            where = " router" if "router" in node.name else " lm_head" if "lm_head" in node.name else ""
            label = node.op_type + where
            bits = attrs.get("expert_weight_bits", attrs.get("bits"))
            label += f" {bits}-bit" if bits else ""
            label += f" block {attrs['block_size']}" if "block_size" in attrs else ""
            label += f" accuracy_level {attrs['accuracy_level']}" if "accuracy_level" in attrs else ""
            seen[label] += 1
    return "ops " + ", ".join(f"{k} x{v}" for k, v in seen.items())


def _set_threads(out: Path, threads: int) -> None:
    """genai_config.json: the decoder session's intra-op threads (the builder leaves ORT's default)."""
    path = out / "genai_config.json"
    cfg = json.loads(path.read_text())
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    path.write_text(json.dumps(cfg, indent=4))


def _og_generator(model, tokens_total: int):  # noqa: ANN001, ANN202
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=tokens_total, min_length=tokens_total, do_sample=False)
    return og.Generator(model, params)


def _og_time(model, plan: Plan) -> tuple[float, float]:  # noqa: ANN001
    gen = _og_generator(model, plan.prompt_len + plan.new_tokens)
    t0 = time.perf_counter()
    gen.append_tokens(plan.prompt)  # prefill; its last logits pick the first new token
    t1 = time.perf_counter()
    for _ in range(plan.new_tokens - 1):
        gen.generate_next_token()
    return t1 - t0, time.perf_counter() - t1


def ortgenai_variant(src: Path, work: Path, plan: Plan, ref: np.ndarray,
                     options: list[str] | None = None) -> tuple[Row, Prepared | None]:
    """ONNX Runtime GenAI int4 (QMoE experts, MatMulNBits attention / router / lm_head: the builder's
    defaults unless OPTIONS say otherwise), where it runs."""
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        return Row(ORTGENAI_INT4, why=f"onnxruntime-genai is not installed ({exc})"), None
    options = sorted(options or [])
    tag = hashlib.sha1("\n".join(options).encode()).hexdigest()[:8] if options else ""
    out = work / ("ortgenai-int4" + (f"-{tag}" if tag else ""))
    why = build_ortgenai(src, out, options)
    if why:
        print(f"# {ORTGENAI_INT4}: {why}", file=sys.stderr)
        return Row(ORTGENAI_INT4, why=why), None
    _set_threads(out, plan.threads)
    row = Row(ORTGENAI_INT4, size_mb=size_mb(out), notes=[onnx_ops(out / "model.onnx")]
              + ([f"builder options {' '.join(options)}"] if options else []))
    model = og.Model(str(out))
    gen = _og_generator(model, plan.error_len + 1)
    gen.append_tokens(plan.error_tokens)
    logits = np.asarray(gen.get_output("logits"), dtype=np.float32).reshape(plan.error_len, -1)
    del gen
    row.set_errors(logit_errors(ref, logits))
    _og_time(model, warm_up(plan))
    return row, Prepared(lambda: _og_time(model, plan), logits)
