"""Where the op-contract builders write their nodes.

The builders of the mixport bodies (``passes.moe_bodies`` for MoE, ``exporter.routing_onnx``
for TopKRouting) call ``op`` / ``op1`` / ``const`` / ``name`` of an ``Emitter`` and get tensor
names back; the emitter picks unique names and decides how a constant is stored. ``Nodes``
writes a function body (constants as Constant nodes: a FunctionProto has no initializers);
the fast ONNX Runtime graph's builder (``runtime.ort_graph``) writes a graph's nodes and
initializers through the same four calls. One builder per variant, whatever the container.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import onnx
from onnx import helper, numpy_helper


class Emitter(Protocol):
    def name(self, hint: str) -> str:
        """A tensor name not used before in this container."""
        ...

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "",
           outputs: list[str] | None = None, **attrs: Any) -> list[str]:
        """One node; its output names (``outputs`` when given, else fresh ones)."""
        ...

    def op1(self, op_type: str, inputs: list[str], domain: str = "", **attrs: Any) -> str:
        """One node with one output; that output's name."""
        ...

    def const(self, hint: str, value: np.ndarray) -> str:
        """A constant tensor holding ``value`` (dtype kept); its name."""
        ...


class Nodes:
    """An Emitter that collects the nodes of a function body; constants become Constant nodes."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "",
           outputs: list[str] | None = None, **attrs: Any) -> list[str]:
        outs = outputs or [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, domain=domain, **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], domain: str = "", **attrs: Any) -> str:
        return self.op(op_type, inputs, 1, domain, **attrs)[0]

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.name(hint)
        tensor = numpy_helper.from_array(np.asarray(value, order="C"), name)
        self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        return name


def last(em: Emitter, op_type: str, inputs: list[str], out: str | None, **attrs: Any) -> str:
    """The final node of a builder: its output named ``out`` when the caller fixed a name."""
    return em.op(op_type, inputs, outputs=[out] if out else None, **attrs)[0]
