"""The quantization error of a quantized folder: what ``mixport check`` measures, and its limits.

A quantized export (``manifest.quantization``) is compared with the fp32 PyTorch reference
built from its *unquantized* source checkpoint (``manifest.source``): the fp32 tolerances of
``check.TOLERANCES`` do not apply; the error is measured and held to ``LIMITS`` (per scheme).
Backends measured: ONNX Runtime on model.onnx (what any runtime runs: blocked
DequantizeLinear -> MatMul, the MoE node's portable body) and the fast ONNX Runtime graph
(what ``mixport run`` uses on CPU) when it can be built. What is measured (``prompt``: seeded
random tokens, ``QUANT_PROMPT_LEN`` of them, fewer when the context is short):

* Teacher-forced: the sequence prompt + the reference's N greedy tokens (N = ``steps``) is run
  through each model in one prefill (each with its own cache); at each of its positions:
  - logit error: max and RMS of |logits - reference logits|, also divided by the *logit
    scale* = the RMS over positions of the reference logits' standard deviation over the
    vocabulary (softmax ignores an offset; the spread is what decides tokens);
  - top-1 agreement: the fraction of positions whose argmax equals the reference's;
  - expert agreement, per MoE layer: the fraction of tokens whose top-k expert set equals the
    reference's, a token whose reference k-th and (k+1)-th router logits tie (``check.TIE_GAP``)
    counted as agreeing (either pick is right), as the fp32 check does;
  - the cache outputs (present.*.key / .value): max and RMS error, worst layer (informative).
* Free-running greedy agreement: each model generates N tokens greedily from the prompt on its
  own; agreement = (tokens before the first difference) / N. After a difference the two
  continue from different text, so later positions are not compared. Shown, not judged.
* Implementation error: max |logits - the logits of the same PyTorch model on the source
  weights quantized -> dequantized by ``mixport/quant.py``| / logit scale. Quantization error
  and implementation error kept apart: a wrong scale shows here as O(1), whatever the scheme.
* Perplexity (``--text FILE``): the file tokenized with the folder's tokenizer, cut at the
  model's context, run in chunks through the reference and each backend: exp(mean negative
  log-likelihood of each token given those before it). Limit: quantized / reference ratio.

``LIMITS`` were chosen from measurements on the tiny and the mini-Mixtral (seeded random
weights; see the table above ``LIMITS``): a correct quantization passes with margin; one
expert's scale x 4 fails the implementation limit, a scale shared across experts fails both
(exit 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixport.artifact import Manifest, QuantRecord
from mixport.errors import CheckUnavailable
from mixport.tools.check import RoutingStat

QUANT_PROMPT_LEN = 64  # teacher-forced positions = this + steps (capped at the context)
CHUNK = 512  # tokens per forward call when a --text file is scored


@dataclass(frozen=True)
class Limits:
    """Pass/fail limits of one quantization scheme (agreements are fractions; errors / logit scale)."""

    rms_logit: float  # RMS logit error / logit scale <=
    top1: float  # teacher-forced top-1 agreement >=
    experts: float  # every MoE layer's expert agreement >=
    perplexity: float  # perplexity ratio quantized / reference <= (with --text)


# The implementation error vs the dequantized reference's logits, relative to the logit scale:
EXACT = 1e-3  # max error <=, model.onnx with fp32 activations (check_quant.EXACT_QDQ): measured ~1e-5
APPROXIMATE = 0.1  # RMS error <=, a graph whose quantized MatMuls quantize activations to int8 (ONNX
#                    Runtime's MatMulNBits accuracy level 4, the fast graph): its max is not judged, since
#                    activation rounding may flip a near-tied router at one position (max ~1 scale there,
#                    measured on the tiny int8 export) while its RMS stays ~0.01-0.03


# Chosen from measurements (prompt seeds 0-9 on the tiny model, 0-4 on the
# mini-Mixtral, 64 random prompt tokens + 16 greedy; worst case over seeds, correct quantization, block 32):
#
#   scheme    model  RMS/scale  top-1   experts (worst layer)   | one scale shared across experts
#   int8      tiny   <= 0.063   >= 0.963  >= 0.975              | RMS 0.32-0.35, top-1 <= 0.61
#   int8      mini   <= 0.090   >= 0.887  >= 0.950              | RMS 0.58-0.59, top-1 <= 0.24
#   int4      tiny   <= 0.188   >= 0.637  >= 0.800              | RMS 0.83-0.87, top-1 <= 0.19
#   int4      mini   <= 0.360   >= 0.463  >= 0.662              | RMS 1.03-1.04, top-1 0
#   int4-zp   tiny   <= 0.182   >= 0.675  >= 0.850              | RMS 0.59-0.66, top-1 <= 0.35
#   int4-zp   mini   <= 0.335   >= 0.425  >= 0.775              | RMS 0.88-0.89, top-1 <= 0.09
#
# Models with random weights are the hard case (no structure to absorb the noise: a trained model's
# tokens are far more decisive), so these limits are floors a correct quantization of any model should
# clear, with >= 1.4x margin on the measured worst case; they fail a scale shared across experts. One
# expert's scale x 4 is what the implementation row catches: the same run's PyTorch model on the source
# weights quantized -> dequantized by the contract (mixport/quant.py) must match to 1% of the logit scale
# (a correct export measures ~1e-5; a wrong scale of one expert, >= 0.3 on the tiny model).
# Not judged, shown: the max logit error (one token routed to another expert moves its logits by O(1)
# scale even in int8: 0.4-2.9 on the mini) and the free-running greedy agreement (one near-tie flips the
# rest of the continuation: int8 0.0-1.0 over seeds on the mini; the teacher-forced top-1 measures the same
# without the cascade).
LIMITS: dict[str, Limits] = {
    "int8": Limits(rms_logit=0.15, top1=0.80, experts=0.90, perplexity=1.02),
    "int4": Limits(rms_logit=0.50, top1=0.35, experts=0.55, perplexity=1.10),
    "int4-zp": Limits(rms_logit=0.50, top1=0.35, experts=0.55, perplexity=1.10),
}


@dataclass
class ErrorStat:
    """One output's error over the teacher-forced positions."""

    name: str
    max_abs: float
    rms: float
    scale: float = 0.0  # the reference's logit scale (logits only; 0: not judged)

    @property
    def max_rel(self) -> float:
        return self.max_abs / self.scale if self.scale else math.nan

    @property
    def rms_rel(self) -> float:
        return self.rms / self.scale if self.scale else math.nan


@dataclass
class BackendStat:
    """One quantized backend measured against the reference."""

    name: str
    outputs: list[ErrorStat] = field(default_factory=list)  # logits first
    positions: int = 0
    top1: int = 0
    greedy: list[int] = field(default_factory=list)  # its free-running greedy tokens
    routing: list[RoutingStat] = field(default_factory=list)  # empty: not observable in this backend
    perplexity: float | None = None
    implementation: float = 0.0  # max |logits - the dequantized reference's logits|
    implementation_rms: float = 0.0  # their RMS difference
    implementation_limit: float = EXACT  # the limit of the max (EXACT) or of the RMS (APPROXIMATE), / logit scale

    @property
    def implementation_judged(self) -> float:
        """What the implementation limit applies to: the max difference, or the RMS for APPROXIMATE."""
        return self.implementation_rms if self.implementation_limit == APPROXIMATE else self.implementation

    def implementation_ok(self, scale: float) -> bool:
        return self.implementation_judged <= self.implementation_limit * scale
    skipped: str | None = None  # why this backend was not measured


@dataclass
class QuantReport:
    scheme: str  # int8 | int4 | int4-zp
    record: QuantRecord
    limits: Limits
    reference: str  # the reference runner's name
    ref_tokens: list[int] = field(default_factory=list)  # the reference's free-running greedy tokens
    backends: list[BackendStat] = field(default_factory=list)
    dense_layers: list[int] = field(default_factory=list)
    text: str | None = None  # the --text file
    text_tokens: int = 0
    ref_perplexity: float | None = None
    notes: list[str] = field(default_factory=list)

    def greedy_agreement(self, tokens: list[int]) -> float:
        """Tokens before the first difference from the reference's, over the N generated."""
        n = 0
        for a, b in zip(self.ref_tokens, tokens, strict=False):
            if a != b:
                break
            n += 1
        return n / len(self.ref_tokens) if self.ref_tokens else 1.0

    def failures(self) -> list[str]:
        """What is beyond ``limits``, by name ("<backend>: <metric>")."""
        lim, out = self.limits, []
        for b in (b for b in self.backends if b.skipped is None):
            logits = b.outputs[0]
            checks = [("implementation error", b.implementation_ok(logits.scale)),
                      ("RMS logit error", logits.rms_rel <= lim.rms_logit),
                      ("top-1 agreement", b.top1 >= lim.top1 * b.positions)]
            checks += [(f"experts of layer {r.layer}", agreement(r) >= lim.experts) for r in b.routing]
            if b.perplexity is not None and self.ref_perplexity is not None:
                checks.append(("perplexity", b.perplexity <= lim.perplexity * self.ref_perplexity))
            out += [f"{b.name}: {what}" for what, ok in checks if not ok]
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()


def agreement(r: RoutingStat) -> float:
    """Tokens with the reference's expert set (a mismatch on a reference tie counts as agreeing)."""
    return (r.agree + r.tie_mismatch) / r.tokens if r.tokens else 1.0


def limits_for(record: QuantRecord) -> tuple[str, Limits]:
    scheme = record.scheme or f"int{record.bits}" + ("" if record.symmetric else "-zp")
    if scheme not in LIMITS:
        raise CheckUnavailable("no error limits for this quantization scheme", given=scheme,
                               expected=" | ".join(LIMITS), hint="a newer mixport may know it")
    return scheme, LIMITS[scheme]


# ---- running a token sequence through a model, chunk by chunk ---------------------------------

Infer = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def run_sequence(infer: Infer, tokens: list[int], empty_past: list[np.ndarray], chunk: int
                 ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(start, outputs) per chunk of ``tokens``, each chunk continuing the previous one's cache
    (the ``present.*`` outputs fed back as ``past_key_values.*``; a model that keeps its own
    cache may return none)."""
    past = empty_past
    layers = len(empty_past) // 2
    for start in range(0, len(tokens), chunk):
        ids = np.array([tokens[start:start + chunk]], dtype=np.int64)
        end = start + ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, end), np.int64),
                "position_ids": np.arange(start, end, dtype=np.int64)[None]}
        for i in range(layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        out = infer(feed)
        if "present.0.key" in out:
            past = [out[f"present.{i}.{kv}"] for i in range(layers) for kv in ("key", "value")]
        yield start, out


def perplexity(infer: Infer, tokens: list[int], empty_past: list[np.ndarray], chunk: int = CHUNK) -> float:
    """exp(mean NLL) of tokens[1:], each given the tokens before it."""
    nll, count = 0.0, 0
    for start, out in run_sequence(infer, tokens, empty_past, chunk):
        logits = out["logits"][0].astype(np.float64)  # [S, V]
        targets = np.array(tokens[start + 1:start + 1 + len(logits)], dtype=np.int64)  # the last token: none
        logits = logits[:len(targets)]
        top = logits.max(axis=1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        nll += float((logz - logits[np.arange(len(targets)), targets]).sum())
        count += len(targets)
    return math.exp(nll / count)


def output_errors(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], layers: int) -> list[ErrorStat]:
    """logits (with the reference's logit scale), then present.*.key and .value (worst layer)."""
    r = ref["logits"][0].astype(np.float64)
    diff = got["logits"][0].astype(np.float64) - r
    scale = float(np.sqrt(np.mean(np.var(r, axis=-1))))
    stats = [ErrorStat("logits", float(np.abs(diff).max()), float(np.sqrt(np.mean(diff ** 2))), scale)]
    for kv in ("key", "value"):
        names = [f"present.{i}.{kv}" for i in range(layers)
                 if f"present.{i}.{kv}" in got and f"present.{i}.{kv}" in ref]  # transformers' cropped
        #                                                 sliding-window caches are not reported (torch_runners)
        if names:
            d = [got[n].astype(np.float64) - ref[n] for n in names]
            stats.append(ErrorStat(f"present.*.{kv}", max(float(np.abs(x).max()) for x in d),
                                   max(float(np.sqrt(np.mean(x ** 2))) for x in d)))
    return stats


def top1(ref_logits: np.ndarray, logits: np.ndarray) -> int:
    """Positions (of [1, S, V] logits) whose argmax is the reference's."""
    return int((ref_logits[0].argmax(-1) == logits[0].argmax(-1)).sum())


# ---- the --text file -----------------------------------------------------------------------------

def text_tokens(folder: Path, path: Path, context: int) -> list[int]:
    """The --text file tokenized with the folder's tokenizer, at most ``context`` tokens; one line
    (CheckUnavailable) for a file that is missing, unreadable, not UTF-8, or under 2 tokens."""
    from mixport.runtime.tokenizer import load_tokenizer

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckUnavailable("the --text file was not found", given=str(path), expected="a UTF-8 text file") from None
    except UnicodeDecodeError as exc:
        raise CheckUnavailable("the --text file is not UTF-8 text", given=f"{path} (byte {exc.start})",
                               expected="a UTF-8 text file") from None
    except OSError as exc:
        raise CheckUnavailable("the --text file cannot be read", given=f"{path}: {exc.strerror or exc}",
                               expected="a readable UTF-8 text file") from None
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise CheckUnavailable("perplexity needs the folder's tokenizer", given=f"{folder} has no tokenizer.json",
                               expected="an export folder with tokenizer.json", hint="drop --text")
    ids = tokenizer.encode(text)[:context]
    if len(ids) < 2:
        raise CheckUnavailable("the --text file is too short to score", given=f"{path}: {len(ids)} token(s)",
                               expected="at least 2 tokens of text")
    return ids


def require_quantized(manifest: Manifest, folder: Path) -> QuantRecord:
    if manifest.quantization is None:
        raise CheckUnavailable("the folder's weights are not quantized", given=str(folder),
                               expected="an export made with --quantize int8|int4",
                               hint="--reference dequantized and --text apply to quantized folders only")
    return manifest.quantization


def describe(record: QuantRecord) -> str:
    zp = "zero points" if not record.symmetric else "symmetric"
    head = ", lm_head too" if record.lm_head else ""
    return f"{record.scheme or 'int' + str(record.bits)} (block {record.block_size}, {zp}{head})"
