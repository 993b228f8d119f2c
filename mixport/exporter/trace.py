"""Trace the reference model to ONNX with the dynamo exporter, then finish the graph.

Finishing: clean initializer names (= the checkpoint's mixport names), one name per
dynamic dim, the TopKRouting function body attached, symbolic dims asserted.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import torch

from mixport import ops
from mixport.artifact import TRACED_DATA
from mixport.errors import ExportError
from mixport.exporter import routing_onnx
from mixport.exporter.checkpoint import LazyWeight
from mixport.models.components import DecoderModel

DIM_NAMES = {"batch": "batch", "seq": "seq", "past": "past_seq", "total": "total_seq"}
TOTAL = "total_seq"  # past_seq + seq
SPILL_OVER = 256  # initializers of more bytes are spilled to the work file (onnx_ir.save's default)
ONNX_FLOAT = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
              torch.bfloat16: onnx.TensorProto.BFLOAT16}


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


class _Flat(torch.nn.Module):
    """Flat outputs (logits, present...) for the exporter."""

    def __init__(self, model: DecoderModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past):  # noqa: ANN001
        logits, present = self.model(input_ids, attention_mask, position_ids, past)
        return logits, *present


def _example(model: DecoderModel) -> tuple[tuple, dict]:
    """B=2, S=3, P=2: every dim >= 2 so none is specialized to a constant."""
    cfg = model.cfg
    dtype = model.lm_head.weight.dtype
    dev = model.lm_head.weight.device  # meta when tracing without weights
    b, s, p = 2, 3, 2
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(0)).to(dev)
    mask = torch.ones(b, p + s, dtype=torch.int64, device=dev)
    pos = torch.arange(p, p + s, device=dev)[None].expand(b, s).contiguous()
    past = [torch.zeros(b, cfg.num_key_value_heads, p, cfg.head_dim, dtype=dtype, device=dev)
            for _ in range(2 * cfg.num_hidden_layers)]
    B, S, P, T = (torch.export.Dim(n, max=1 << 20) for n in ("batch", "seq", "past", "total"))
    dyn = {"input_ids": {0: B, 1: S}, "attention_mask": {0: B, 1: T},
           "position_ids": {0: B, 1: S}, "past": [{0: B, 2: P}] * len(past)}
    return (ids, mask, pos, past), dyn


def trace(model: DecoderModel, weights: dict[str, Any] | None = None, spill_dir: Path | None = None,
          on_tensor: Callable[[int, int], None] | None = None) -> onnx.ModelProto:
    """The exported (unfused) model: TopKRouting nodes + per-expert FFNs.

    ``model`` may live on the meta device (no weights in memory while tracing); ``weights``
    then supplies every initializer by state_dict name (tensors, or LazyWeights read one at a
    time while the graph is serialized).
    ``spill_dir``: the weights are streamed to ``spill_dir/TRACED_DATA`` a tensor at a time and
    the returned graph points there (external data) instead of holding a second copy;
    ``on_tensor(done, total)`` after each one.
    """
    routing_onnx.register_schema()
    args, dyn = _example(model)
    inputs, outputs = io_names(model.cfg.num_hidden_layers)
    table = {torch.ops.mixport.topk_routing.default: routing_onnx.translation(model.cfg.num_local_experts)}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _Flat(model), args, dynamo=True, optimize=False, opset_version=routing_onnx.ONNX_OPSET,
                dynamic_shapes=dyn, custom_translation_table=table, input_names=inputs,
                output_names=outputs, report=False, verbose=False)
    except Exception as exc:  # the exporter raises many types; one clear line for the user
        raise ExportError("torch.onnx.export failed", given=f"{type(exc).__name__}: {str(exc)[:300]}",
                          expected="a traceable reference model") from exc
    if weights is not None:
        _attach_weights(program.model, weights, model)
    if spill_dir is None:
        proto = program.model_proto
    else:
        import onnx_ir as ir

        report = None if on_tensor is None else (lambda _t, info: on_tensor(info.index + 1, info.total))
        ir.external_data.unload_from_model(  # each weight read, written, dropped
            program.model, Path(spill_dir), TRACED_DATA, size_threshold_bytes=SPILL_OVER, callback=report)
        proto = ir.serde.serialize_model(program.model)  # the graph, pointing into TRACED_DATA
    del program  # the exporter's graph holds references to every weight
    gc.collect()
    finish(proto, model)
    return proto


def _attach_weights(ir_model: Any, weights: dict[str, Any], model: DecoderModel) -> None:
    """Each initializer gets its checkpoint tensor: a torch tensor, or a LazyWeight read (and
    converted) only when the graph is serialized, then dropped (one weight in memory at a time)."""
    import onnx_ir as ir
    from onnx_ir.tensor_adapters import TorchTensor

    extra = model.computed_buffers()  # inv_freq: not in the checkpoint
    for name, value in ir_model.graph.initializers.items():
        key = name.removeprefix("model.")
        tensor = weights.get(key, extra.get(key))
        if tensor is None:
            raise ExportError("the traced graph needs a weight the checkpoint did not provide", given=key,
                              expected="a reference-model state_dict name")
        if isinstance(tensor, LazyWeight):
            value.const_value = ir.LazyTensor(lambda w=tensor, n=name: TorchTensor(w.read().contiguous(), name=n),
                                              dtype=value.dtype, shape=value.shape, name=name)
        else:
            value.const_value = TorchTensor(tensor.contiguous(), name=name)


def _rename_dims(proto: onnx.ModelProto) -> None:
    """Exporter dim names ('past + seq', 's17'...) -> batch, seq, past_seq, total_seq."""
    for vi in [*proto.graph.input, *proto.graph.output]:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                name = d.dim_param.replace(" ", "")
                d.dim_param = DIM_NAMES.get(name, TOTAL if "+" in name else name)


def _check_dims(proto: onnx.ModelProto) -> None:
    expected = {"input_ids": ["batch", "seq"], "attention_mask": ["batch", TOTAL],
                "position_ids": ["batch", "seq"], "logits": ["batch", "seq", None]}
    for vi in [*proto.graph.input, *proto.graph.output]:
        dims = [d.dim_param or None for d in vi.type.tensor_type.shape.dim]
        want = expected.get(vi.name)
        if want is None:
            want = ["batch", None, "past_seq" if vi.name.startswith("past") else TOTAL, None]
        if any(w is not None and d != w for d, w in zip(dims, want, strict=True)):
            raise ExportError(f"exported input/output '{vi.name}' lost a dynamic dimension",
                              given=dims, expected=want, hint="the trace specialized a dim to a constant")


def finish(proto: onnx.ModelProto, model: DecoderModel) -> None:
    for init in proto.graph.initializer:
        init.name = init.name.removeprefix("model.")
    for node in proto.graph.node:
        node.input[:] = [n.removeprefix("model.") if n.startswith("model.") else n for n in node.input]
    _rename_dims(proto)
    _check_dims(proto)
    cfg = model.cfg
    elem = ONNX_FLOAT[model.lm_head.weight.dtype]
    proto.functions.append(routing_onnx.routing_function(cfg.num_experts_per_tok, cfg.normalization, elem,
                                                          cfg.routing_order, spec=cfg.routing(),
                                                          num_experts=cfg.num_local_experts))
    if not any(o.domain == ops.DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION))
