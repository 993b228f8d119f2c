"""``mixport::MoE`` as a TensorRT IPluginV3 (glue only; kernels live elsewhere).

    hidden [T, H], weights [T, k], ids [T, k] int64, gate_up [E, H, 2F], down [E, F, H]
    -> out [T, H] = sum_j weights[t, j] * FFN_{ids[t, j]}(hidden[t])
    T tokens, H hidden, F expert FFN width, E experts, k active experts per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from mixport.ops import ACTIVATIONS, MOE
from mixport.plugins import device
from mixport.plugins.base import FLOAT_TYPES, KERNEL_DTYPES, CreatorCore, PluginCore, type_name
from mixport.plugins.fields import FieldSpec
from mixport.plugins.kernels.workspace import moe_scratch_bytes, moe_workspace_bytes

FIELDS = (
    FieldSpec("num_experts", "int"),
    FieldSpec("k", "int"),
    FieldSpec("activation", "str", "swiglu", ACTIVATIONS),
)
HIDDEN, WEIGHTS, IDS, GATE_UP, DOWN = range(5)  # input positions; the output is 5


class MoEPlugin(PluginCore):
    """Sparse top-k expert dispatch with SwiGLU experts."""

    op_name: ClassVar[str] = MOE
    field_specs: ClassVar[tuple[FieldSpec, ...]] = FIELDS
    n_outputs: ClassVar[int] = 1

    def get_output_data_types(self, input_types: Sequence[Any]) -> list[Any]:
        return [input_types[HIDDEN]]

    def get_output_shapes(self, inputs: Sequence[Any], shape_inputs: Sequence[Any],
                          expr_builder: Any) -> list[Any]:
        return [self.trt.DimsExprs(inputs[HIDDEN])]  # [T, H]

    def accepts_type(self, pos: int, names: list[str], num_inputs: int) -> bool:
        if pos == HIDDEN:
            return names[HIDDEN] in FLOAT_TYPES
        if pos == IDS:
            return names[IDS] == "INT64"
        return names[pos] == names[HIDDEN]  # weights, gate_up, down and out

    def shape_checks(self, dims: list[tuple[int, ...]]) -> list[tuple[str, int, int]]:
        experts, k = int(self.values["num_experts"]), int(self.values["k"])
        ranks = [(f"input {i} rank", len(d), r) for i, d in enumerate(dims)
                 for r in [(2, 2, 2, 3, 3)[i]]]
        if any(found != expected for _, found, expected in ranks):
            return ranks
        hidden, (e_gu, h_gu, two_f), (e_dn, f_dn, h_dn) = dims[HIDDEN][1], dims[GATE_UP], dims[DOWN]
        return [("weights k (dim 1)", dims[WEIGHTS][1], k), ("ids k (dim 1)", dims[IDS][1], k),
                ("gate_up experts (dim 0)", e_gu, experts), ("down experts (dim 0)", e_dn, experts),
                ("gate_up hidden (dim 1)", h_gu, hidden), ("down hidden (dim 2)", h_dn, hidden),
                ("down ffn (dim 1) vs gate_up 2F/2", f_dn, two_f // 2 if two_f >= 0 else -1)]

    def get_workspace_size(self, inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
        """fused_moe's scratch for any token count up to the profile's maximum (``kernels.workspace``)."""
        tokens, hidden = (max(int(d), 0) for d in inputs[HIDDEN].max)
        experts, _, two_ffn = (max(int(d), 0) for d in inputs[GATE_UP].max)
        return moe_workspace_bytes(tokens, hidden, two_ffn // 2, experts, int(self.values["k"]),
                                   KERNEL_DTYPES[type_name(inputs[HIDDEN])])

    def launch(self, input_desc: Sequence[Any], output_desc: Sequence[Any],
               inputs: Sequence[int], outputs: Sequence[int], workspace: int,
               stream: int) -> None:
        if not device.all_nonempty(output_desc):
            return
        from mixport.plugins import kernels

        args = [device.as_tensor(ptr, desc) for ptr, desc in zip(inputs, input_desc, strict=True)]
        out = device.as_tensor(outputs[0], output_desc[0])
        (tokens, hidden), (experts, _, two_ffn) = args[HIDDEN].shape, args[GATE_UP].shape
        need = moe_scratch_bytes(tokens, hidden, two_ffn // 2, experts, int(self.values["k"]),
                                 KERNEL_DTYPES[type_name(input_desc[HIDDEN])])
        scratch = device.as_bytes(workspace, need)
        with device.on_stream(stream):  # every intermediate lives in TensorRT's workspace
            kernels.fused_moe(*args, workspace=scratch, out=out)


class MoECreator(CreatorCore):
    """Creates ``MoEPlugin`` from node attributes or serialized fields."""

    plugin_core: ClassVar[type[PluginCore]] = MoEPlugin
