"""``mixport::TopKRouting`` as a TensorRT IPluginV3 (glue only; kernels live elsewhere).

    logits [T, E] float  ->  weights [T, k] same float type,  ids [T, k] int64
    T tokens, E experts, k active experts per token.

    with a selection bias (version "3"): inputs logits [T, E], bias [E] float

Three creators, one per ``plugin_version`` a node may carry (the parser looks a creator up by
name, version and namespace): "3" lists the version-3 fields (sigmoid / sparsemixer scoring,
n_group, topk_group, group_score, routed_scaling_factor, sparsemixer_eps) and takes the optional
bias input, "2" lists the ``order`` field, "1" (files written before ``order`` existed) does not
and always computes ``softmax_topk``. Versions "1" and "2" score with softmax only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from mixport.ops import GROUP_SCORES, NORMALIZATIONS, ORDERS, ROUTING_PLUGIN_VERSION, SCORING_FUNCS, TOPK_ROUTING
from mixport.plugins import device
from mixport.plugins.base import FLOAT_TYPES, CreatorCore, PluginCore
from mixport.plugins.fields import FieldSpec

FIELDS_V2 = (
    FieldSpec("num_experts", "int"),
    FieldSpec("k", "int"),
    FieldSpec("scoring_func", "str", "softmax", SCORING_FUNCS[:1]),
    FieldSpec("normalization", "str", "renormalize", NORMALIZATIONS),
    FieldSpec("order", "str", ORDERS[0], ORDERS),
)
FIELDS_V1 = tuple(spec for spec in FIELDS_V2 if spec.name != "order")  # plugin_version "1": no order
FIELDS = (  # plugin_version "3"
    *(FieldSpec("scoring_func", "str", "softmax", SCORING_FUNCS) if s.name == "scoring_func" else s
      for s in FIELDS_V2),
    FieldSpec("n_group", "int", 1),
    FieldSpec("topk_group", "int", 1),
    FieldSpec("group_score", "str", GROUP_SCORES[0], GROUP_SCORES),
    FieldSpec("routed_scaling_factor", "float", 1.0),
    FieldSpec("sparsemixer_eps", "float", 0.0),
)


class TopKRoutingPlugin(PluginCore):
    """The TopKRouting contract (``ops.py``, version 3): softmax / sigmoid / sparsemixer scores, an
    optional selection bias input, grouped top-k, renormalization, routed scaling; one row per token
    (no workspace)."""

    op_name: ClassVar[str] = TOPK_ROUTING
    version: ClassVar[str] = ROUTING_PLUGIN_VERSION
    field_specs: ClassVar[tuple[FieldSpec, ...]] = FIELDS
    n_outputs: ClassVar[int] = 2

    def get_output_data_types(self, input_types: Sequence[Any]) -> list[Any]:
        return [input_types[0], self.trt.DataType.INT64]

    def get_output_shapes(self, inputs: Sequence[Any], shape_inputs: Sequence[Any],
                          expr_builder: Any) -> list[Any]:
        out = self.trt.DimsExprs(inputs[0])  # [T, E] -> [T, k]
        out[1] = expr_builder.constant(int(self.values["k"]))
        return [out, self.trt.DimsExprs(out)]

    def accepts_type(self, pos: int, names: list[str], num_inputs: int) -> bool:
        if pos == 0:
            return names[0] in FLOAT_TYPES  # logits
        if pos < num_inputs:
            return names[pos] in FLOAT_TYPES  # the selection bias (version 3), any float type
        if pos == num_inputs:
            return names[pos] == names[0]  # weights follow the logits type
        return names[pos] == "INT64"  # ids

    def shape_checks(self, dims: list[tuple[int, ...]]) -> list[tuple[str, int, int]]:
        experts = int(self.values["num_experts"])
        if len(dims[0]) != 2:
            return [("logits rank", len(dims[0]), 2)]
        checks = [("logits experts (dim 1)", dims[0][1], experts)]
        if int(self.values["k"]) > experts:
            checks.append(("k (at most num_experts)", int(self.values["k"]), experts))
        return checks

    def launch(self, input_desc: Sequence[Any], output_desc: Sequence[Any],
               inputs: Sequence[int], outputs: Sequence[int], workspace: int,
               stream: int) -> None:
        if not device.all_nonempty(output_desc):
            return
        from mixport.plugins import kernels

        logits = device.as_tensor(inputs[0], input_desc[0])
        out_weights = device.as_tensor(outputs[0], output_desc[0])
        out_ids = device.as_tensor(outputs[1], output_desc[1])
        bias = device.as_tensor(inputs[1], input_desc[1]) if len(inputs) > 1 else None
        v = self.values
        with device.on_stream(stream):  # no scratch: the kernel writes TensorRT's outputs directly
            kernels.topk_routing(logits, int(v["k"]), str(v["normalization"]), order=self.order,
                                 scoring=str(v["scoring_func"]), bias=bias, n_group=int(v.get("n_group", 1)),
                                 topk_group=int(v.get("topk_group", 1)),
                                 group_score=str(v.get("group_score", GROUP_SCORES[0])),
                                 scaling=float(v.get("routed_scaling_factor", 1.0)),
                                 eps=float(v.get("sparsemixer_eps", 0.0)), out=(out_weights, out_ids))

    @property
    def order(self) -> str:
        """The kernel mode: the ``order`` field ("softmax_topk" where the version has none)."""
        return str(self.values.get("order", ORDERS[0]))


class TopKRoutingPluginV2(TopKRoutingPlugin):
    """The version-2 node (``order``, softmax scoring, one input)."""

    version: ClassVar[str] = "2"
    field_specs: ClassVar[tuple[FieldSpec, ...]] = FIELDS_V2


class TopKRoutingPluginV1(TopKRoutingPlugin):
    """The version-1 node (no ``order`` field): softmax -> top-k."""

    version: ClassVar[str] = "1"
    field_specs: ClassVar[tuple[FieldSpec, ...]] = FIELDS_V1


class TopKRoutingCreator(CreatorCore):
    """Creates ``TopKRoutingPlugin`` from node attributes or serialized fields."""

    plugin_core: ClassVar[type[PluginCore]] = TopKRoutingPlugin


class TopKRoutingV2Creator(CreatorCore):
    """Creates ``TopKRoutingPluginV2`` (nodes with plugin_version "2")."""

    plugin_core: ClassVar[type[PluginCore]] = TopKRoutingPluginV2


class TopKRoutingV1Creator(CreatorCore):
    """Creates ``TopKRoutingPluginV1`` (nodes with plugin_version "1")."""

    plugin_core: ClassVar[type[PluginCore]] = TopKRoutingPluginV1
