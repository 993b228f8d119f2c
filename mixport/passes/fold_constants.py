"""fold_constants: Constant nodes -> initializers, and constant subgraphs evaluated once.

onnx-graphsurgeon's folder (ONNX Runtime underneath); mixport custom nodes are never
evaluated, tensors over SIZE_LIMIT bytes are not materialized, and a subgraph ONNX
Runtime cannot run (bf16 on CPU, say) is left as it was, quietly.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from mixport import ops

NAME = "fold_constants"
SIZE_LIMIT = 16 << 20


def _keep(node: gs.Node) -> bool:
    """Never evaluate mixport nodes; keep Transpose(weight) so weights keep their checkpoint
    names and single copy (runtimes fold that transpose at load, the fast ORT graph reads by name);
    likewise a per-layer vector parameter reshaped for broadcasting or cast to fp32 (GPT-OSS's attention
    sinks, which an fp16 export upcasts: folded, the sinks would lose their name)."""
    if node.domain == ops.DOMAIN:
        return True
    if node.op in ("Reshape", "Unsqueeze", "Cast") and isinstance(node.inputs[0], gs.Constant) \
            and node.inputs[0].name.startswith("layers.") and len(node.inputs[0].shape) == 1:
        return True
    weight = node.inputs[0] if node.op == "Transpose" else None
    return isinstance(weight, gs.Constant) and int(np.prod(weight.shape)) >= 1024  # shape: no load


def apply(graph: gs.Graph, reasons: list[str] | None = None) -> int:
    """Fold; return how many nodes disappeared."""
    before = len(graph.nodes)
    old, G_LOGGER.severity = G_LOGGER.severity, G_LOGGER.CRITICAL
    try:
        graph.fold_constants(size_threshold=SIZE_LIMIT, error_ok=True, should_exclude_node=_keep)
    finally:
        G_LOGGER.severity = old
    graph.cleanup()
    folded = before - len(graph.nodes)
    if not folded and reasons is not None:
        reasons.append(f"{NAME}: nothing constant to fold")
    return folded
