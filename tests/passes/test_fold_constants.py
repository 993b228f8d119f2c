"""fold_constants before and after: ONNX Runtime gives the same outputs, bit for bit.

Both runs have ONNX Runtime's own graph optimizations off, so the only difference
between them is the pass: the constant subgraphs it evaluated once (through ONNX
Runtime's CPU kernels) are evaluated at run time in the original, with the same kernels.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from mixport.exporter.tiny import TINY
from mixport.passes import fold_constants
from mixport.passes import graph_utils as gu

from .conftest import model_feed


def run_plain(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output, by name, with ONNX Runtime's graph optimizations disabled."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def test_fold_constants_keeps_the_outputs_exactly(tiny_unfused: onnx.ModelProto) -> None:
    """On the tiny export, prepared as run_passes prepares it (Constant attributes as tensors)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(tiny_unfused)
    gu.tensorize_constants(proto)
    graph = gs.import_onnx(proto)
    folded_count = fold_constants.apply(graph, [])
    assert folded_count > 0
    folded = gs.export_onnx(graph)
    ops_before = Counter(n.op_type for n in tiny_unfused.graph.node)
    ops_after = Counter(n.op_type for n in folded.graph.node)
    assert ops_before["Constant"] > 0 and ops_after["Constant"] == 0
    assert sum(ops_before.values()) - sum(ops_after.values()) == folded_count
    assert folded_count > ops_before["Constant"]  # constant subgraphs (Cast, Reshape...) were evaluated too
    for seq, batch, seed in ((7, 2, 0), (2, 1, 1)):
        feed = model_feed(TINY.num_hidden_layers, seq, batch, seed)
        before, after = run_plain(tiny_unfused, feed), run_plain(folded, feed)
        assert before.keys() == after.keys() and "logits" in before
        for name in before:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
