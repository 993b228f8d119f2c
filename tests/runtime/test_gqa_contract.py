"""What the fast graph relies on in ONNX Runtime's com.microsoft.GroupQueryAttention (CPU), measured
on the installed ONNX Runtime: separate query/key/value inputs, ``scale``, ``local_window_size``
as the reference's sliding window (components.attention_bias), and the head sizes it runs
(``ort_graph.HEAD_DIM_MULTIPLE``, the rule ``ort_graph.supported`` applies)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from mixport.models.components import attention_bias, repeat_kv, rotary
from mixport.runtime import ort_graph

Q, G, P = 4, 2, 32  # query heads, kv heads, cache capacity


def _gqa(d: int, window: int | None, scale: float, packed: bool) -> ort.InferenceSession:
    vi = helper.make_tensor_value_info
    f = TensorProto.FLOAT
    qkv = [vi("q", f, ["b", "s", (Q + 2 * G) * d if packed else Q * d])]
    if not packed:
        qkv += [vi("k", f, ["b", "s", G * d]), vi("v", f, ["b", "s", G * d])]
    inputs = [*qkv, vi("past_k", f, ["b", G, P, d]), vi("past_v", f, ["b", G, P, d]),
              vi("seqlens_k", TensorProto.INT32, ["b"]), vi("total", TensorProto.INT32, []),
              vi("cos", f, [P, d // 2]), vi("sin", f, [P, d // 2])]
    attrs = {} if window is None else {"local_window_size": window}
    node = helper.make_node("GroupQueryAttention",
                            ["q", "" if packed else "k", "" if packed else "v", "past_k", "past_v", "seqlens_k",
                             "total", "cos", "sin"], ["out", "present_k", "present_v"], domain="com.microsoft",
                            num_heads=Q, kv_num_heads=G, do_rotary=1, rotary_interleaved=0, scale=scale, **attrs)
    outputs = [vi(n, f, None) for n in ("out", "present_k", "present_v")]
    model = helper.make_model(helper.make_graph([node], "gqa", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _rope(d: int) -> tuple[np.ndarray, np.ndarray]:
    freqs = np.arange(P, dtype=np.float32)[:, None] / 1e4 ** (np.arange(0, d, 2, dtype=np.float32) / d)
    return np.cos(freqs), np.sin(freqs)


def _run(session: ort.InferenceSession, q: np.ndarray, k: np.ndarray, v: np.ndarray, packed: bool,
         chunks: list[int]) -> np.ndarray:
    """q/k/v [S, heads*D] fed in ``chunks`` (a prefill, then decode steps) -> out [S, Q*D]."""
    d = k.shape[1] // G
    cos, sin = _rope(d)
    past_k = past_v = np.zeros((1, G, P, d), np.float32)
    outs, start = [], 0
    for n in chunks:
        part = slice(start, start + n)
        feed = {"past_k": past_k, "past_v": past_v, "seqlens_k": np.array([start + n - 1], np.int32),
                "total": np.array(start + n, np.int32), "cos": cos, "sin": sin}
        if packed:
            feed["q"] = np.concatenate([q, k, v], axis=1)[None, part]
        else:
            feed.update(q=q[None, part], k=k[None, part], v=v[None, part])
        out, past_k, past_v = session.run(None, feed)
        outs.append(out[0])
        start += n
    return np.concatenate(outs)


def _reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int | None, scale: float) -> np.ndarray:
    """components' attention: RoPE, GQA heads, the additive bias of attention_bias(window)."""
    s, d = q.shape[0], k.shape[1] // G
    cos, sin = (torch.from_numpy(np.concatenate([c[:s], c[:s]], axis=1))[None, None] for c in _rope(d))
    qt, kt, vt = (torch.from_numpy(t).view(1, s, -1, d).transpose(1, 2) for t in (q, k, v))
    qt, kt = rotary(qt, cos, sin), rotary(kt, cos, sin)
    bias = attention_bias(torch.ones(1, s, dtype=torch.int64), 0, s, window)
    scores = qt @ repeat_kv(kt, Q // G).transpose(2, 3) * scale + bias
    return (torch.softmax(scores, -1) @ repeat_kv(vt, Q // G)).transpose(1, 2).reshape(s, -1).numpy()


@pytest.mark.parametrize("window", [None, 1, 3, 4])
@pytest.mark.parametrize("packed", [True, False], ids=["packed-qkv", "separate-qkv"])
def test_local_window_size_is_the_reference_window(window: int | None, packed: bool) -> None:
    """local_window_size w: the query at position p sees keys p-w+1..p, in a prefill and in decode
    steps (what ort_layers.attention sets from cfg.window(i))."""
    rng = np.random.default_rng(0)
    d, s, scale = 16, 11, 0.3
    q, k, v = (rng.standard_normal((s, n * d)).astype(np.float32) for n in (Q, G, G))
    got = _run(_gqa(d, window, scale, packed), q, k, v, packed, [5, 1, 1, 2, 1, 1])
    np.testing.assert_allclose(got, _reference(q, k, v, window, scale), atol=1e-5, rtol=1e-5)
    if window is not None:  # the window matters here: full attention gives something else
        assert np.abs(got - _reference(q, k, v, None, scale)).max() > 1e-2


@pytest.mark.parametrize("head_dim", [8, 12, 16, 24, 32, 40, 48, 64, 128])
def test_head_sizes_groupqueryattention_runs_are_the_supported_ones(head_dim: int) -> None:
    """ONNX Runtime's CPU GQA with rotary runs head sizes that are a multiple of 16 (8 without
    rotary); ``supported`` refuses the others with that reason, before building anything."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((3, n * head_dim)).astype(np.float32) for n in (Q, G, G))
    cfg = {"model_type": "mixtral", "head_dim": head_dim}
    why = ort_graph.supported(cfg, "fp32")
    try:
        _run(_gqa(head_dim, None, head_dim**-0.5, False), q, k, v, False, [3])
        runs = True
    except Exception as exc:  # onnxruntime's own error types
        assert "head_size" in str(exc), exc
        runs = False
    assert runs == (why is None), (head_dim, why)
    assert why is None or f"head_dim {head_dim}" in why
