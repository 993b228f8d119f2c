"""Make an exported ONNX file parseable by TensorRT: fold constant subgraphs first.

TensorRT's parser needs some inputs as build-time constants (ReduceMean's axes,
Reshape shapes...) that the torch exporter leaves as small constant subgraphs.
onnx-graphsurgeon folds them (ONNX Runtime underneath). Partitions are folded
one by one ("recursive"): one subgraph ONNX Runtime refuses (a double-typed
Expand in the tiny export) must not stop the others. mixport nodes are never
evaluated. Without plugins, the MoE nodes need a body TensorRT can parse: the
portable (sparse) body is swapped for ``passes.moe_bodies``' dense one (the
trt-noplugin target's). Files whose weights live in external data are
parsed as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mixport.ops import DOMAIN

log = logging.getLogger("mixport.engine")
FOLDED_FILE = "model.folded.onnx"


def has_external_data(model: object) -> bool:
    """True when any initializer of ``model`` (a ModelProto) points to external data."""
    from onnx import TensorProto

    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)  # type: ignore[attr-defined]


def _fold(model: object) -> tuple[object, int]:
    """(folded ModelProto, nodes folded away); mixport nodes are never evaluated."""
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.logger import G_LOGGER

    graph = gs.import_onnx(model)
    before = len(graph.nodes)
    old, G_LOGGER.severity = G_LOGGER.severity, G_LOGGER.CRITICAL
    try:
        graph.fold_constants(error_ok=True, partitioning="recursive",
                             should_exclude_node=lambda node: node.domain == DOMAIN)
        graph.cleanup()
    finally:
        G_LOGGER.severity = old
    folded = before - len(graph.nodes)
    if folded == 0:
        return model, 0
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version  # type: ignore[attr-defined]
    return out, folded


def _dense_moe_body(model: object) -> bool:
    """Swap the MoE function body for the shipped dense one TensorRT parses; False without MoE nodes."""
    from mixport.passes import moe_bodies

    return bool(moe_bodies.attach(model, "dense"))  # type: ignore[arg-type]


def prepare_for_parser(onnx_path: Path, work_dir: Path, use_plugins: bool = True) -> tuple[Path, int]:
    """(file to parse, nodes folded away); a changed copy is written into ``work_dir``."""
    import onnx

    from mixport import onnx_io

    model = onnx.load(str(onnx_path), load_external_data=False)
    onnx_io.check_external_locations(onnx_path, model)  # before anything reads external data
    if has_external_data(model):
        log.info("%s keeps its weights in external data: parsed without folding", onnx_path)
        return onnx_path, 0
    model, folded = _fold(model)
    dense = not use_plugins and _dense_moe_body(model)
    if not folded and not dense:
        return onnx_path, 0
    path = Path(work_dir) / FOLDED_FILE
    onnx.save(model, str(path))
    return path, folded
