"""remove_dead: drop nodes and initializers no graph output depends on, then toposort."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from mixport.passes import graph_utils as gu

NAME = "remove_dead"


def apply(graph: gs.Graph, reasons: list[str] | None = None) -> int:
    """Return how many nodes + initializers were removed."""
    before = gu.node_count(graph) + gu.initializer_count(graph)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    removed = before - gu.node_count(graph) - gu.initializer_count(graph)
    if not removed and reasons is not None:
        reasons.append(f"{NAME}: every node and initializer is used")
    return removed
