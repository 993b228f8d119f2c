"""The fast graph's emitter: nodes and initializers with unique names, over an export's weights
that remember which ones were read (``runtime/ort_graph.build`` refuses an export with a weight
it did not read)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mixport.models import Adapter
from mixport.models.config import MoEConfig

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


class Builder:
    """Nodes and initializers with unique names (an ``passes.emit.Emitter``); ``cfg``: the model's
    config; ``names``: the family's adapter (weight names)."""

    def __init__(self, weights: dict[str, np.ndarray], dtype: np.dtype, cfg: MoEConfig, names: Adapter) -> None:
        self.w, self.dtype, self.cfg, self.names = Reads(weights), dtype, cfg, names
        self.elem = helper.np_dtype_to_tensor_dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

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
