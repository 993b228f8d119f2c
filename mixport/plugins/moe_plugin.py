"""``mixport::MoE`` as a TensorRT IPluginV3 (glue only; kernels live elsewhere).

    hidden [T, H], weights [T, k], ids [T, k] int64, gate_up [E, H, 2F], down [E, F, H]
    -> out [T, H] = sum_j weights[t, j] * FFN_{ids[t, j]}(hidden[t])
    T tokens, H hidden, F expert FFN width, E experts, k active experts per token, B block size.

Version "2" (quantized experts, ``MoEPluginV2``) adds the fields ``bits`` and ``block_size`` and
takes, after hidden / weights / ids (``mixport.ops``; the kernel layout is ``kernels.qlayout``'s):

    gate_up  INT8 [E, H, 2F]  (bits 8)  |  INT8 [E, H, 2*ceil(F/2)]  (bits 4: packed bytes)
    down     INT8 [E, F, H]   (bits 8)  |  INT8 [E, F, ceil(H/2)]    (bits 4: packed bytes)
    gate_up_scale [E, ceil(H/B), 2F], down_scale [E, ceil(F/B), H]: hidden's type
    gate_up_zero INT8 [E, ceil(H/B), 2*ceil(F/2)], down_zero INT8 [E, ceil(F/B), ceil(H/2)]
                 (9 inputs: uint4 weights with zero points, packed bytes)

Version "3" (expert biases + the clamped SwiGLU, ``MoEPluginV3``, GPT-OSS) adds the fields ``alpha``
and ``limit`` (FLOAT32; ``activation`` "swiglu_clamped" or "swiglu") and takes, after the five float
inputs, gate_up_bias [E, 2F] and down_bias [E, H] in hidden's type (``kernels.fused_moe_biased``).
A version-"3" node with quantized experts has no plugin: ``mixport build`` refuses it with one line
(``engine/network.check_plugin_version``); ``--no-plugins`` builds its function body.

Packed int4 travels typed INT8: TensorRT has INT4 only as DequantizeLinear weights and no UINT8
plugin tensors, so ``mixport.engine`` re-types the file's INT4/UINT4 initializers as INT8 bytes
before parsing (``engine/quant_inputs.py``: the same bytes when F and H are even), and the plugin
views them as uint8 for the kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from mixport.ops import (
    ACTIVATIONS,
    BIAS_PLUGIN_VERSION,
    MOE,
    QUANT_INPUTS,
    QUANT_PLUGIN_VERSION,
    SWIGLU_ALPHA,
    SWIGLU_LIMIT,
    ZERO_INPUTS,
)
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
GATE_UP_SCALE, DOWN_SCALE, GATE_UP_ZERO, DOWN_ZERO = range(5, 9)  # version 2's extra inputs
QUANT_BLOCKS = tuple(2**i for i in range(4, 11))  # block sizes the kernels take (16..1024)
FIELDS_V2 = (*FIELDS, FieldSpec("bits", "int", None, (8, 4)), FieldSpec("block_size", "int", None, QUANT_BLOCKS))
FIELDS_V3 = (*FIELDS, FieldSpec("alpha", "float", SWIGLU_ALPHA), FieldSpec("limit", "float", SWIGLU_LIMIT))
GATE_UP_BIAS, DOWN_BIAS = 5, 6  # version 3's extra inputs (float experts)


class MoEPlugin(PluginCore):
    """Sparse top-k expert dispatch with SwiGLU experts."""

    op_name: ClassVar[str] = MOE
    field_specs: ClassVar[tuple[FieldSpec, ...]] = FIELDS
    n_outputs: ClassVar[int] = 1
    SHAPED_2F: ClassVar[int] = GATE_UP  # the input whose dims are [E, *, 2F] in elements (not packed bytes)

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
        experts, _, two_ffn = (max(int(d), 0) for d in inputs[self.SHAPED_2F].max)
        return moe_workspace_bytes(tokens, hidden, two_ffn // 2, experts, int(self.values["k"]),
                                   KERNEL_DTYPES[type_name(inputs[HIDDEN])])

    def launch(self, input_desc: Sequence[Any], output_desc: Sequence[Any],
               inputs: Sequence[int], outputs: Sequence[int], workspace: int,
               stream: int) -> None:
        if not device.all_nonempty(output_desc):
            return
        args = self.tensors(inputs, input_desc)
        out = device.as_tensor(outputs[0], output_desc[0])
        (tokens, hidden), (experts, _, two_ffn) = args[HIDDEN].shape, args[self.SHAPED_2F].shape
        need = moe_scratch_bytes(tokens, hidden, two_ffn // 2, experts, int(self.values["k"]),
                                 KERNEL_DTYPES[type_name(input_desc[HIDDEN])])
        scratch = device.as_bytes(workspace, need)
        with device.on_stream(stream):  # every intermediate lives in TensorRT's workspace
            self.dispatch(args, scratch, out)

    def tensors(self, inputs: Sequence[int], input_desc: Sequence[Any]) -> list[Any]:
        """The inputs as torch tensors on the device (views of TensorRT's buffers)."""
        return [device.as_tensor(ptr, desc) for ptr, desc in zip(inputs, input_desc, strict=True)]

    def dispatch(self, args: list[Any], scratch: Any, out: Any) -> None:
        from mixport.plugins import kernels

        kernels.fused_moe(*args, workspace=scratch, out=out)


class MoECreator(CreatorCore):
    """Creates ``MoEPlugin`` from node attributes or serialized fields."""

    plugin_core: ClassVar[type[PluginCore]] = MoEPlugin


def _cdiv(a: int, b: int) -> int:
    return -(-a // b) if a >= 0 else -1  # -1: a dimension not known until runtime


class MoEPluginV2(MoEPlugin):
    """Quantized experts (plugin_version "2"): int8, int4, or uint4 with zero points, dequantized
    inside the grouped GEMMs (``kernels.fused_moe_quantized``)."""

    version: ClassVar[str] = QUANT_PLUGIN_VERSION
    field_specs: ClassVar[tuple[FieldSpec, ...]] = FIELDS_V2
    SHAPED_2F: ClassVar[int] = GATE_UP_SCALE  # int4 weights arrive packed: the scales keep 2F

    @property
    def bits(self) -> int:
        return int(self.values["bits"])

    @property
    def block_size(self) -> int:
        return int(self.values["block_size"])

    def accepts_type(self, pos: int, names: list[str], num_inputs: int) -> bool:
        if num_inputs not in (7, 9) or (num_inputs == 9 and self.bits != 4):
            return False  # zero points only with 4-bit weights
        if pos in (GATE_UP, DOWN) or (pos < num_inputs and pos >= GATE_UP_ZERO):
            return names[pos] == "INT8"  # int8 values, or int4 / uint4 packed two per byte
        return super().accepts_type(pos, names, num_inputs)  # hidden, weights, ids; scales and out: hidden's

    def _packed(self, n: int) -> int:
        """Last dim of an N-column weight as the plugin takes it (N = -1: unknown)."""
        return n if self.bits == 8 or n < 0 else -(-n // 2)

    def shape_checks(self, dims: list[tuple[int, ...]]) -> list[tuple[str, int, int]]:
        experts, k = int(self.values["num_experts"]), int(self.values["k"])
        names = ("hidden", "weights", "ids", "gate_up", "down", *QUANT_INPUTS, *ZERO_INPUTS)
        ranks = [(f"{names[i]} rank", len(d), 2 if i < GATE_UP else 3) for i, d in enumerate(dims)]
        if any(found != expected for _, found, expected in ranks):
            return ranks
        h = dims[HIDDEN][1]
        e_gu, h_gu, gu_n = dims[GATE_UP]
        e_dn, f_dn, dn_n = dims[DOWN]
        e_gs, nb_h, two_f = dims[GATE_UP_SCALE]
        e_ds, nb_f, h_ds = dims[DOWN_SCALE]
        f = two_f // 2 if two_f >= 0 else -1
        checks = [("weights k (dim 1)", dims[WEIGHTS][1], k), ("ids k (dim 1)", dims[IDS][1], k),
                  *((f"{names[i]} experts (dim 0)", dims[i][0], experts) for i in range(GATE_UP, len(dims))),
                  ("gate_up hidden (dim 1)", h_gu, h), ("down_scale hidden (dim 2)", h_ds, h),
                  ("down ffn (dim 1) vs gate_up_scale 2F/2", f_dn, f),
                  ("gate_up_scale blocks (dim 1)", nb_h, _cdiv(h, self.block_size)),
                  ("down_scale blocks (dim 1)", nb_f, _cdiv(f, self.block_size)),
                  ("gate_up columns (dim 2)", gu_n, 2 * self._packed(f) if f >= 0 else -1),
                  ("down columns (dim 2)", dn_n, self._packed(h))]
        if len(dims) == 9:  # zero points: shaped like the scales, packed like the weights
            checks += [("gate_up_zero blocks (dim 1)", dims[GATE_UP_ZERO][1], nb_h),
                       ("gate_up_zero columns (dim 2)", dims[GATE_UP_ZERO][2], gu_n),
                       ("down_zero blocks (dim 1)", dims[DOWN_ZERO][1], nb_f),
                       ("down_zero columns (dim 2)", dims[DOWN_ZERO][2], dn_n)]
        return checks

    def tensors(self, inputs: Sequence[int], input_desc: Sequence[Any]) -> list[Any]:
        import torch

        args = super().tensors(inputs, input_desc)
        if self.bits == 4:  # packed bytes travel as INT8; the kernels read them as uint8
            args = [a.view(torch.uint8) if i in (GATE_UP, DOWN, GATE_UP_ZERO, DOWN_ZERO) else a
                    for i, a in enumerate(args)]
        return args

    def dispatch(self, args: list[Any], scratch: Any, out: Any) -> None:
        from mixport.plugins import kernels

        kernels.fused_moe_quantized(*args, bits=self.bits, block_size=self.block_size, workspace=scratch, out=out)


class MoEV2Creator(CreatorCore):
    """Creates ``MoEPluginV2`` (nodes with plugin_version "2": quantized experts)."""

    plugin_core: ClassVar[type[PluginCore]] = MoEPluginV2


class MoEPluginV3(MoEPlugin):
    """Float experts with biases and the clamped SwiGLU (plugin_version "3", GPT-OSS):
    ``kernels.fused_moe_biased``."""

    version: ClassVar[str] = BIAS_PLUGIN_VERSION
    field_specs: ClassVar[tuple[FieldSpec, ...]] = FIELDS_V3

    def accepts_type(self, pos: int, names: list[str], num_inputs: int) -> bool:
        if num_inputs != 7:
            return False  # quantized experts with biases: no plugin (network.check_plugin_version says so)
        return super().accepts_type(pos, names, num_inputs)  # the biases and out: hidden's type

    def shape_checks(self, dims: list[tuple[int, ...]]) -> list[tuple[str, int, int]]:
        ranks = [(f"input {i} rank", len(d), r) for i, d in enumerate(dims) for r in [(2, 2, 2, 3, 3, 2, 2)[i]]]
        if any(found != expected for _, found, expected in ranks):
            return ranks
        experts, two_f, hidden = int(self.values["num_experts"]), dims[GATE_UP][2], dims[HIDDEN][1]
        return [*super().shape_checks(dims[:DOWN + 1]),
                ("gate_up_bias experts (dim 0)", dims[GATE_UP_BIAS][0], experts),
                ("gate_up_bias 2F (dim 1)", dims[GATE_UP_BIAS][1], two_f),
                ("down_bias experts (dim 0)", dims[DOWN_BIAS][0], experts),
                ("down_bias hidden (dim 1)", dims[DOWN_BIAS][1], hidden)]

    def dispatch(self, args: list[Any], scratch: Any, out: Any) -> None:
        from mixport.plugins import kernels

        kernels.fused_moe_biased(*args, activation=str(self.values["activation"]), alpha=float(self.values["alpha"]),
                                 limit=float(self.values["limit"]), workspace=scratch, out=out)


class MoEV3Creator(CreatorCore):
    """Creates ``MoEPluginV3`` (nodes with plugin_version "3": expert biases, clamped SwiGLU)."""

    plugin_core: ClassVar[type[PluginCore]] = MoEPluginV3
