"""Probe (issue 12 groundwork): does ONNX Runtime run standard blocked DequantizeLinear -> MatMul exactly?

Prints, for int4 / uint4 (+ zero points) / int8 weights with ``block_size`` along the input axis
(opset 21), the max |error| against a float64 numpy reference: graph optimizations off, at the
default level, and with each ``session.qdq_matmulnbits_accuracy_level``. Measured on ONNX Runtime
1.32 CPU (2026-11-29): exact (6e-6) with optimizations off or accuracy level 0/1/2; the default
fuses into MatMulNBits at accuracy level 4 (int8 activations), 0.13 on outputs of magnitude 25.

    python tools/probe_ort_blocked_dq.py [--k 64 --n 24 --block 32]
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def model(w: np.ndarray, scale: np.ndarray, block: int, qtype: int) -> bytes:
    k, n = w.shape
    stored = w + 8 if qtype == TensorProto.UINT4 else w
    inits = [helper.make_tensor("w", qtype, [k, n], stored.flatten().tolist()), numpy_helper.from_array(scale, "s")]
    dq = helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], axis=0, block_size=block)
    if qtype == TensorProto.UINT4:  # asymmetric storage: zero point 8 per block
        inits.append(helper.make_tensor("zp", qtype, list(scale.shape), [8] * scale.size))
        dq.input.append("zp")
    graph = helper.make_graph([dq, helper.make_node("MatMul", ["x", "wd"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--block", type=int, default=32)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    w = rng.integers(-8, 8, size=(args.k, args.n)).astype(np.int8)
    scale = rng.random((args.k // args.block, args.n)).astype(np.float32)
    x = rng.random((2, args.k)).astype(np.float32)
    ref = x.astype(np.float64) @ (w.astype(np.float64) * np.repeat(scale, args.block, axis=0))
    print(f"onnxruntime {ort.get_version_string()}, K={args.k} N={args.n} block={args.block}, "
          f"|y| max {np.abs(ref).max():.1f}")
    settings: list[tuple[str, ort.SessionOptions]] = []
    off = ort.SessionOptions()
    off.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    settings += [("optimizations off", off), ("default", ort.SessionOptions())]
    for level in ("0", "1", "2", "4"):
        so = ort.SessionOptions()
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", level)
        settings.append((f"accuracy_level {level}", so))
    for qtype in (TensorProto.INT4, TensorProto.UINT4, TensorProto.INT8):
        proto = model(w, scale, args.block, qtype)
        for name, so in settings:
            sess = ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"])
            err = np.abs(sess.run(None, {"x": x})[0] - ref).max()
            print(f"  {TensorProto.DataType.Name(qtype):6} {name:18} max |error| {err:.2e}")


if __name__ == "__main__":
    main()
