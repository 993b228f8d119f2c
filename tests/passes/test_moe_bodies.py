"""The MoE function bodies: ONNX Runtime folds the sparse body's weight slabs at load time."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort

from mixport import ops
from mixport.passes import run_pipeline
from mixport.tools.moe_layer import LayerSpec, dense_layer


def test_ort_folds_weight_slabs_instead_of_copying_per_run(tmp_path: Path) -> None:
    """After ORT's load-time optimizations no Gather/Slice reads weights: each expert has its own
    initializer and a run reads it in place (timing evidence: tools/bench_moe.py, `fused no-fold`)."""
    fused, _ = run_pipeline(dense_layer(LayerSpec(hidden=32, inter=48, experts=4, k=2)))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(fused.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    weights = {t.name for t in optimized.graph.initializer if len(t.dims) >= 2}
    slicing = [n for n in optimized.graph.node if n.op_type in ("Gather", "Slice") and n.input[0] in weights]
    assert not slicing, [n.input[0] for n in slicing]
    stacked = {t.name for t in fused.graph.initializer if len(t.dims) == 3}
    assert stacked and not stacked & weights  # the stacked slabs are gone, folded per expert
    matmul_weights = {n.input[1] for n in optimized.graph.node if n.op_type == "MatMul"}
    assert len(matmul_weights & weights) == 3 * 4  # gate, up, down for each of the 4 experts


def test_bodies_declare_the_contract_signature() -> None:
    for target in ("portable", "trt-noplugin"):
        fused, _ = run_pipeline(dense_layer(LayerSpec(hidden=16, inter=24, experts=4, k=1)), target=target)
        body = next(f for f in fused.functions if f.domain == ops.DOMAIN and f.name == ops.MOE)
        assert list(body.input) == ["hidden", "weights", "ids", "gate_up", "down"]
        assert list(body.output) == ["out"]
        assert set(body.attribute) == {"num_experts", "k", "activation", "plugin_namespace", "plugin_version"}
