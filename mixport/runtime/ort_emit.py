"""The fast graph's emitter: nodes and initializers with unique names, over an export's weights
that remember which ones were read (``runtime/ort_graph.build`` refuses an export with a weight
it did not read).

Linear layers go through ``proj`` (the weight of x @ [W_1 | W_2 | ..], columns side by side) and
``matmul``. A weight that model.onnx already holds in the layout the fast graph multiplies by (an
expert's [H, 2F] gate|up or [F, H] down slab, a quantized [in, out] weight, the embeddings) is not
copied: the initializer points at its bytes in model.onnx (``ort_weights``, ``onnx_locate``); a
float state-dict [out, in] weight is pointed at through a Transpose (ONNX Runtime folds it when the
session starts). A quantized weight (``<name>_quantized`` [in, out] + ``_scale`` [+ ``_zero_point``],
``passes/quantize_weights``) is multiplied as blocked ``DequantizeLinear(axis=0) -> MatMul``, which
ONNX Runtime's CPU provider fuses into ``com.microsoft.MatMulNBits`` when the session starts, at the
accuracy level the session asks for (``ort_session.QUANT_ACCURACY_LEVEL``); joined weights (q|k|v)
are concatenated along their columns, exact since each block belongs to one column.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mixport.errors import RuntimeFailure
from mixport.models import Adapter
from mixport.models.config import MoEConfig
from mixport.passes import nbits
from mixport.runtime import ort_weights
from mixport.runtime.ort_weights import QUANTIZED, SCALE, ZERO

MS = "com.microsoft"


class Reads(dict):
    """The export's weights by name; remembers which ones the builder read."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        super().__init__(weights)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> np.ndarray:
        value = super().__getitem__(key)
        self.read.add(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def is_weight(name: str, value: np.ndarray) -> bool:
    """A weight of the model, which the fast graph must build from, rather than a constant of
    the traced graph it re-expresses (a scalar: eps, scale, mask value; an int64 shape/axes
    vector): a state-dict (dotted) name, or any other tensor."""
    return "." in name or (value.ndim > 0 and not (value.ndim == 1 and value.dtype == np.int64))


POINT_AT = 4096  # bytes: a weight this big or bigger is pointed at in model.onnx, not copied


class Builder:
    """Nodes and initializers with unique names (an ``passes.emit.Emitter``); ``cfg``: the model's
    config; ``names``: the family's adapter (weight names). ``weights``: an ``ort_weights.Exported``
    lets the builder point at model.onnx's bytes; a plain dict is copied."""

    def __init__(self, weights: dict[str, np.ndarray], dtype: np.dtype, cfg: MoEConfig, names: Adapter,
                 accuracy_level: int = nbits.ACCURACY_LEVEL) -> None:
        self.w, self.dtype, self.cfg, self.names = Reads(weights), dtype, cfg, names
        self.accuracy_level = accuracy_level  # of the QMoE nodes (MatMulNBits': the session's)
        self.origins: dict[str, ort_weights.Origin] = getattr(weights, "origins", {})
        self.where: dict[str, ort_weights.Where] = getattr(weights, "where", {})
        self.elem = helper.np_dtype_to_tensor_dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0
        self.dequantize: dict[str, tuple[list[str], int]] = {}  # proj name -> DequantizeLinear inputs, block
        self.transposed: set[str] = set()  # proj names that hold [out, in]: multiplied through a Transpose
        self.qmoe: dict[str, dict[str, Any]] = {}  # initializers the session supplies (ort_qmoe): recipes

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, order="C"), name))
        return name

    def scalar(self, hint: str, value: float) -> str:
        """A scalar constant of the graph's float type."""
        return self.const(hint, np.array(value, dtype=self.dtype))

    def weight(self, key: str, value: np.ndarray | None = None) -> str:
        """An initializer named ``key`` (value: the export's tensor of that name unless given; then
        pointed at in model.onnx when it is big and of the graph's float type)."""
        arr = self.w[key] if value is None else value
        if value is None and self._point(key, key, arr):
            return key
        self.inits.append(numpy_helper.from_array(np.asarray(arr, dtype=self.dtype, order="C"), key))
        return key

    def _point(self, name: str, key: str, arr: np.ndarray, slab: ort_weights.Slab | None = None) -> bool:
        """Make initializer ``name`` point at model.onnx's bytes of ``key`` (or of expert
        ``slab.index`` of the stacked ``slab.tensor``); False when it cannot (small, cast, not raw)."""
        where = self.where.get(slab.tensor if slab else key)
        if where is None or arr.nbytes < POINT_AT or (arr.dtype.kind == "f" and arr.dtype != self.dtype):
            return False
        if slab is not None:
            where = where.part(slab.index, slab.count)
        packed = arr.dtype in (nbits.quant.INT4, nbits.quant.UINT4)  # two per byte
        if where.length != ((arr.size + 1) // 2 if packed else arr.nbytes):
            return False
        self.inits.append(where.pointer(name, helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape)))
        return True

    def quantized(self, key: str) -> bool:
        """Does the export hold weight ``key`` quantized (``key_quantized``, ``key_scale``...)?"""
        return key + QUANTIZED in self.w

    def proj(self, name: str, keys: list[str]) -> str:
        """The weight ``name`` of x @ [W_keys[0] | W_keys[1] | ..] for ``matmul``: pointed at in
        model.onnx where it lies there whole, else made (see the module docstring)."""
        held = [self.quantized(k) for k in keys]
        if all(held):
            return self._proj_quantized(name, keys)
        if any(held):
            raise RuntimeFailure("the export quantized some of the weights one MatMul of the fast graph joins",
                                 given=", ".join(f"{k}: {'quantized' if h else 'float'}"
                                             for k, h in zip(keys, held, strict=True)),
                                 expected="all quantized or all float", hint="run with --graph portable")
        slab = ort_weights.slab_of(self.origins, keys)
        if len(keys) == 1 and keys[0] not in self.origins and self._point(name, keys[0], self.w[keys[0]]):
            self.transposed.add(name)  # model.onnx holds it [out, in]
            return name
        value = self.linear(keys[0]) if len(keys) == 1 else np.concatenate([self.linear(k) for k in keys], 1)
        if slab is not None and self._point(name, keys[0], value, slab):
            return name
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=self.dtype, order="C"), name))
        return name

    def _proj_quantized(self, name: str, keys: list[str]) -> str:
        zero = [self.w.get(k + ZERO) for k in keys]
        parts = [(self.w[k + QUANTIZED], self.w[k + SCALE], z) for k, z in zip(keys, zero, strict=True)]
        q, scale, z = nbits.concat_columns(parts)
        block = nbits.block_size_of(q.shape[0], scale.shape[0])
        if block is None:
            raise RuntimeFailure("cannot tell the block size of a quantized weight", given=f"{keys[0]}: "
                                 f"{q.shape[0]} rows, {scale.shape[0]} scale rows",
                                 expected=f"{nbits.MIN_BLOCK}..{nbits.MAX_BLOCK} rows a block",
                                 hint="run with --graph portable")
        slab = ort_weights.slab_of(self.origins, keys)
        whole = slab is not None or (len(keys) == 1 and keys[0] not in self.origins)
        inputs = []
        for suffix, value in ((QUANTIZED, q), (SCALE, scale.astype(self.dtype)), (ZERO, z)):
            if value is None:
                continue
            tensor = name + suffix
            source = keys[0] + suffix if slab is None else None
            sl = None if slab is None else ort_weights.Slab(slab.tensor + suffix, slab.index, slab.count)
            if not (whole and self._point(tensor, source or "", value, sl)):
                self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), tensor))
            inputs.append(tensor)
        self.dequantize[name] = (inputs, block)
        return name

    def matmul(self, x: str, w: str, outputs: list[str] | None = None) -> str:
        """x @ the weight ``w`` that ``proj`` (or ``weight``) made."""
        if w in self.dequantize:
            inputs, block = self.dequantize[w]
            w = self.op1("DequantizeLinear", inputs, axis=0, block_size=block)
        elif w in self.transposed:
            w = self.op1("Transpose", [w], perm=[1, 0])
        return self.op("MatMul", [x, w], outputs=outputs)[0]

    def linear(self, key: str) -> np.ndarray:
        """The export's [out, in] Linear weight ``key`` as the [in, out] a MatMul takes."""
        return self.w[key].T

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "",
           outputs: list[str] | None = None, **attrs: Any) -> list[str]:
        outs = outputs or [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), domain=domain,
                                           **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], domain: str = "", **attrs: Any) -> str:
        return self.op(op_type, inputs, 1, domain, **attrs)[0]

    def scaled(self, x: str, factor: float, hint: str = "scale") -> str:
        """x * factor (x itself when the factor is 1: no node)."""
        return x if factor == 1.0 else self.op1("Mul", [x, self.scalar(hint, factor)])
