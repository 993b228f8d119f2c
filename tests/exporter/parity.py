"""Greedy decoding and routing probes shared by the export parity tests.

A *stepper* is one model with its own KV cache: ``step(ids, mask, pos) -> logits [B, S, V]``
(numpy fp32), the cache carried to the next call. Steppers here: an export's model.onnx in a
plain ``onnxruntime.InferenceSession`` (no mixport runtime code: past_key_values.{i}.key/value
in, present.{i}.* out), transformers' own model, mixport's reference model. ``greedy`` drives
one over a prefill and N decode steps, batch rows free-running, left padding allowed.
"""

from __future__ import annotations

import contextlib
import inspect
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

Step = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (ids, mask, pos) -> logits [B, S, V]
NP_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


# ONNX Runtime fuses DequantizeLinear -> MatMul into MatMulNBits, by default with int8 activations
# (accuracy level 4: errors ~0.1 on the tiny model's logits, tools/probe_ort_blocked_dq.py); level 1
# keeps fp32 activations: what exactness tests of a quantized model.onnx run with
EXACT_QDQ = {"session.qdq_matmulnbits_accuracy_level": "1"}


def plain_session(model_path: Path, config: dict[str, str] | None = None):  # -> onnxruntime.InferenceSession
    """``model_path`` in ONNX Runtime's CPU provider, one thread (no scheduling noise); ``config``:
    session config entries."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])


def empty_past(sess: Any, batch: int) -> dict[str, np.ndarray]:  # sess: onnxruntime.InferenceSession
    """Each past_key_values.* input of ``sess`` with no cached tokens ([B, G, 0, D], its float type)."""
    return {i.name: np.zeros([batch, i.shape[1], 0, i.shape[3]], NP_FLOAT[i.type])
            for i in sess.get_inputs() if i.name.startswith("past_key_values.")}


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids of a left-padded batch: 0 at each row's first real token (pads get 0)."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)


@dataclass
class OrtStepper:
    """model.onnx in a plain InferenceSession; each step's presents are the next step's pasts."""

    sess: Any  # onnxruntime.InferenceSession
    past: dict[str, np.ndarray] = field(default_factory=dict)

    def __call__(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        if not self.past:
            self.past = empty_past(self.sess, ids.shape[0])
        names = [o.name for o in self.sess.get_outputs()]
        outs = dict(zip(names, self.sess.run(names, {"input_ids": ids, "attention_mask": mask,
                                                     "position_ids": pos, **self.past}), strict=True))
        self.past = {n.replace("present.", "past_key_values.", 1): v for n, v in outs.items()
                     if n.startswith("present.")}
        return outs["logits"].astype(np.float32)


class HfStepper:
    """transformers' own model (``*ForCausalLM``) with its own cache object."""

    def __init__(self, model: Any) -> None:
        self.model, self.cache = model, None
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def __call__(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = self.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             position_ids=torch.from_numpy(pos), use_cache=True, **{self.cache_arg: self.cache})
        self.cache = getattr(out, "cache", None) or out.past_key_values
        return out.logits.float().numpy()


class SessionStepper:
    """A mixport runtime ``Session`` (``reset(batch)``, ``step(...)``): the cache is the session's."""

    def __init__(self, session: Any) -> None:
        self.session, self.started = session, False

    def __call__(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        if not self.started:
            self.session.reset(ids.shape[0])
            self.started = True
        return np.asarray(self.session.step(ids, mask, pos), dtype=np.float32)


class ReferenceStepper:
    """mixport's reference model (``DecoderModel``): the cache is its list of tensors."""

    def __init__(self, model: Any) -> None:
        self.model, self.past = model, None

    def __call__(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        past = self.past if self.past is not None else self.model.empty_past(ids.shape[0])
        with torch.no_grad():
            logits, self.past = self.model(torch.from_numpy(ids), torch.from_numpy(mask),
                                           torch.from_numpy(np.ascontiguousarray(pos)), past)
        return logits.float().numpy()


@dataclass
class Greedy:
    tokens: np.ndarray  # [B, steps + 1]: the token each row picked after the prefill and each decode step
    logits: list[np.ndarray]  # per forward: [B, S, V] (the prefill's S = prompt length, then 1)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread: tiny models step faster so, and a busy machine does not leave torch's
    worker threads spinning at every op's barrier (seconds per test on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def greedy(step: Step, ids: np.ndarray, mask: np.ndarray, steps: int, forced: np.ndarray | None = None) -> Greedy:
    """A prefill of ``ids`` (rows left-padded where ``mask`` is 0) + ``steps`` greedy decode steps;
    with ``forced`` [B, >= steps], step i decodes forced[:, i] instead of the model's own pick."""
    with one_torch_thread():
        return _greedy(step, ids, mask, steps, forced)


def _greedy(step: Step, ids: np.ndarray, mask: np.ndarray, steps: int, forced: np.ndarray | None) -> Greedy:
    ids, mask = ids.astype(np.int64), mask.astype(np.int64)
    pos = positions(mask)
    tokens, logits = [], []
    for i in range(steps + 1):
        out = step(ids, mask, pos)
        logits.append(out)
        tokens.append(out[:, -1].argmax(-1).astype(np.int64))
        ids = (tokens[-1] if forced is None or i == steps else forced[:, i].astype(np.int64))[:, None]
        mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
        pos = pos[:, -1:] + 1
    return Greedy(np.stack(tokens, axis=1), logits)


def max_logit_error(a: Greedy, b: Greedy, prompt_mask: np.ndarray) -> float:
    """The largest |a - b| over every step's logits (prefill: real tokens only, not the pads)."""
    valid = prompt_mask.astype(bool)
    errs = [float(np.abs(a.logits[0][valid] - b.logits[0][valid]).max())]
    errs += [float(np.abs(x - y).max()) for x, y in zip(a.logits[1:], b.logits[1:], strict=True)]
    return max(errs)


def left_padded_prompt(vocab: int, batch: int = 2, length: int = 11, pads: int = 4,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random prompt ids [B, L] and mask: row 0 full, every other row with ``pads`` left pads."""
    ids = np.random.default_rng(seed).integers(3, vocab, (batch, length))
    mask = np.ones_like(ids)
    mask[1:, :pads] = 0
    ids[1:, :pads] = 0  # a pad id; masked out
    return ids.astype(np.int64), mask.astype(np.int64)


# ---- routing the trace never saw ----------------------------------------------------------------

class RoutingProbe:
    """A copy of model.onnx that also outputs each TopKRouting node's ids, in plain ONNX Runtime."""

    def __init__(self, model_path: Path, tmp: Path) -> None:
        from mixport.tools.check import debug_model

        self.sess = plain_session(debug_model(model_path, tmp))
        self.names = [o.name for o in self.sess.get_outputs()]
        self.layers = sum(n.startswith("routing.") for n in self.names)

    def __call__(self, ids: np.ndarray) -> tuple[np.ndarray, list[set[int]]]:
        """One prefill of ``ids`` (no padding): (logits, the experts each MoE layer picked)."""
        mask = np.ones_like(ids)
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask),
                **empty_past(self.sess, ids.shape[0])}
        outs = dict(zip(self.names, self.sess.run(self.names, feed), strict=True))
        return outs["logits"], [set(np.unique(outs[f"routing.{i}.ids"]).tolist()) for i in range(self.layers)]


def assert_unseen_routing(model_path: Path, ref: Any, stepper: Callable[[], Step] | None = None) -> None:
    """Experts the export's trace example did not reach still compute correctly, at other batch and
    sequence sizes: logits within 1e-4 of the reference model ``ref`` (``DecoderModel``) from
    model.onnx, or from ``stepper()`` (a new stepper of the same export, e.g. mixport's runtime)."""
    from mixport.exporter.trace import _example
    from mixport.models import registry

    cfg = ref.cfg
    (trace_ids, *_), _ = _example(ref)  # the exact input the export traced with
    with tempfile.TemporaryDirectory() as tmp:
        probe = RoutingProbe(model_path, Path(tmp))
        _, seen = probe(trace_ids.numpy())
        assert len(seen) == len(registry.for_config(cfg).moe_layers(cfg))  # one TopKRouting per MoE layer
        assert any(len(s) < cfg.num_local_experts for s in seen), "the trace input already hit every expert"
        rng = np.random.default_rng(1)
        for batch, seq in [(1, 1), (3, 17), (1, 40)]:
            ids = rng.integers(3, cfg.vocab_size, (batch, seq))
            ours, picked = probe(ids)
            if stepper is not None:
                ours = stepper()(ids, np.ones_like(ids), positions(np.ones_like(ids)))
            want = ReferenceStepper(ref)(ids, np.ones_like(ids), positions(np.ones_like(ids)))
            assert np.abs(ours - want).max() <= 1e-4, (batch, seq)
            if seq == 40:  # a long prompt reaches experts the 6-token trace example did not
                assert any(p - s for p, s in zip(picked, seen, strict=True)), (picked, seen)
                assert all(len(p) == cfg.num_local_experts for p in picked), picked
