"""The fast graph's emitter: nodes and initializers with unique names, over an export's weights
that remember which ones were read (``runtime/ort_graph.build`` refuses an export with a weight
it did not read).

Linear layers go through ``proj`` (the weight of x @ [W_1 | W_2 | ..], columns side by side) and
``matmul``: float weights (state-dict [out, in]) become one MatMul initializer; weights a quantized
export holds as ``<name>_quantized`` [in, out] + ``<name>_scale`` (+ ``<name>_zero_point``, see
``passes/quantize_weights``) become one ``com.microsoft.MatMulNBits`` (``passes/nbits`` layouts;
concatenating columns is exact: each block belongs to one column) at ``accuracy_level``."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mixport.errors import RuntimeFailure
from mixport.models import Adapter
from mixport.models.config import MoEConfig
from mixport.passes import nbits

MS = "com.microsoft"
QUANTIZED, SCALE, ZERO = "_quantized", "_scale", "_zero_point"  # passes/quantize_weights' suffixes


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


class Builder:
    """Nodes and initializers with unique names (an ``passes.emit.Emitter``); ``cfg``: the model's
    config; ``names``: the family's adapter (weight names)."""

    def __init__(self, weights: dict[str, np.ndarray], dtype: np.dtype, cfg: MoEConfig, names: Adapter,
                 accuracy_level: int = 0) -> None:
        self.w, self.dtype, self.cfg, self.names = Reads(weights), dtype, cfg, names
        self.elem = helper.np_dtype_to_tensor_dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0
        self.accuracy_level = accuracy_level
        self.packed: dict[str, tuple[list[str], dict[str, int]]] = {}  # proj name -> MatMulNBits inputs, attrs

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
        """An initializer named ``key`` (value: the export's tensor of that name unless given)."""
        arr = self.w[key] if value is None else value
        self.inits.append(numpy_helper.from_array(np.asarray(arr, dtype=self.dtype, order="C"), key))
        return key

    def linear(self, key: str) -> np.ndarray:
        """The export's [out, in] Linear weight ``key`` as the [in, out] a MatMul takes."""
        return self.w[key].T

    def quantized(self, key: str) -> bool:
        """Does the export hold weight ``key`` quantized (``key_quantized``, ``key_scale``...)?"""
        return key + QUANTIZED in self.w

    def qweight(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The quantized weight ``key``: q [in, out], scale [blocks, out], zero or None."""
        zero = self.w.get(key + ZERO)
        return self.w[key + QUANTIZED], self.w[key + SCALE], zero

    def proj(self, name: str, keys: list[str]) -> str:
        """The weight ``name`` of x @ [W_keys[0] | W_keys[1] | ..] for ``matmul``: a float initializer
        [in, sum of outs], or MatMulNBits inputs when the export quantized these weights."""
        held = [self.quantized(k) for k in keys]
        if not any(held):
            value = self.linear(keys[0]) if len(keys) == 1 else np.concatenate([self.linear(k) for k in keys], 1)
            return self.weight(name, value)
        if not all(held):
            raise RuntimeFailure("the export quantized some of the weights one MatMul of the fast graph joins",
                                 given=", ".join(f"{k}: {'quantized' if h else 'float'}" for k, h in zip(keys, held)),
                                 expected="all quantized or all float", hint="run with --graph portable")
        q, scale, zero = nbits.concat_columns([self.qweight(k) for k in keys])
        block = self._block_size(q.shape[0], scale.shape[0], keys[0])
        packed = nbits.to_nbits(q, scale.astype(self.dtype), zero, block)
        inputs = [self.const_named(name, packed.b), self.const_named(f"{name}_scales", packed.scales)]
        if packed.zero_points is not None:
            inputs.append(self.const_named(f"{name}_zero_points", packed.zero_points))
        self.packed[name] = (inputs, packed.attrs())
        return name

    def _block_size(self, rows: int, blocks: int, key: str) -> int:
        block = nbits.block_size_of(rows, blocks)
        if block is None:
            raise RuntimeFailure("cannot tell the block size of a quantized weight", given=f"{key}: {rows} rows, "
                                 f"{blocks} scale rows", expected=f"{nbits.MIN_BLOCK}..{nbits.MAX_BLOCK} rows a block",
                                 hint="run with --graph portable")
        return block

    def const_named(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def matmul(self, x: str, w: str, outputs: list[str] | None = None) -> str:
        """x @ the weight ``w`` that ``proj`` (or ``weight``) made: MatMulNBits or MatMul."""
        if w in self.packed:
            inputs, attrs = self.packed[w]
            return self.op("MatMulNBits", [x, *inputs], 1, MS, outputs, accuracy_level=self.accuracy_level,
                           **attrs)[0]
        return self.op("MatMul", [x, w], outputs=outputs)[0]

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
