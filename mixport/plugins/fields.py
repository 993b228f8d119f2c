"""Plugin fields: declared per plugin, parsed from and serialized to TensorRT collections.

The ONNX parser fills a field from the node attribute of the same name only when
the creator lists that name (int -> INT32, float -> FLOAT32, string -> CHAR).
Fields it does not list — ``plugin_namespace``, ``plugin_version`` — never reach
``create_plugin``; unknown names that do arrive are ignored, never fatal. The node's
``plugin_version`` picks the creator instead (``registry.py``): TopKRouting "3" declares the
version-3 fields (groups, scaling, sparsemixer eps; float -> FLOAT32), "2" ``order``, "1" neither
(``topk_routing_plugin.FIELDS`` / ``FIELDS_V2`` / ``FIELDS_V1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from mixport.errors import PluginError

FieldValue = int | float | str


@dataclass(frozen=True)
class FieldSpec:
    """One plugin field: its name, kind ("int", "float" (>= 0, finite) or "str"), default and allowed values."""

    name: str
    kind: str
    default: FieldValue | None = None
    choices: tuple[FieldValue, ...] = ()

    def check(self, value: FieldValue, op: str) -> FieldValue:
        if self.kind == "int" and (not isinstance(value, int) or value <= 0):
            raise PluginError(f"{op}: field {self.name!r} must be a positive integer",
                              given=value, expected="an int > 0")
        if self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise PluginError(f"{op}: field {self.name!r} must be a finite number >= 0",
                                  given=value, expected="a float >= 0")
            value = float(value)
        if self.choices and value not in self.choices:
            raise PluginError(f"{op}: unsupported {self.name}", given=value,
                              expected=" | ".join(map(str, self.choices)))
        return value


def _decode(field: Any, trt: ModuleType) -> FieldValue:
    data = field.data
    if field.type == trt.PluginFieldType.CHAR:
        return bytes(bytearray(int(b) & 0xFF for b in data)).split(b"\0")[0].decode()
    if len(data) != 1:
        raise PluginError(f"field {field.name!r} must hold one value", given=list(data))
    if field.type == trt.PluginFieldType.FLOAT32:
        return float(data[0])
    return int(data[0])


def parse_fields(trt: ModuleType, op: str, specs: tuple[FieldSpec, ...],
                 collection: Any) -> dict[str, FieldValue]:
    """Read ``collection`` (a PluginFieldCollection) into checked values, defaults filled."""
    by_name = {spec.name: spec for spec in specs}
    found: dict[str, FieldValue] = {}
    for i in range(len(collection)):
        field = collection[i]
        if field.name in by_name:
            found[field.name] = _decode(field, trt)
    values: dict[str, FieldValue] = {}
    for spec in specs:
        value = found.get(spec.name, spec.default)
        if value is None:
            raise PluginError(f"{op}: required field {spec.name!r} is missing",
                              given=sorted(found), expected=[s.name for s in specs],
                              hint=f"set the {spec.name!r} attribute on the ONNX node")
        values[spec.name] = spec.check(value, op)
    return values


def _encode(trt: ModuleType, spec: FieldSpec, value: FieldValue | None) -> Any:
    import numpy as np

    if spec.kind == "str":
        data = np.frombuffer(str(value or "").encode() + b"\0", dtype=np.int8)
        return trt.PluginField(spec.name, data, trt.PluginFieldType.CHAR)
    if spec.kind == "float":
        data = np.array([] if value is None else [value], dtype=np.float32)
        return trt.PluginField(spec.name, data, trt.PluginFieldType.FLOAT32)
    data = np.array([] if value is None else [value], dtype=np.int32)
    return trt.PluginField(spec.name, data, trt.PluginFieldType.INT32)


class FieldBlock:
    """A PluginFieldCollection plus the PluginFields and arrays it points into.

    ``PluginFieldCollection`` copies raw pointers only: the fields (and their
    numpy buffers) must outlive it, so keep the whole block referenced.
    """

    def __init__(self, trt: ModuleType, specs: tuple[FieldSpec, ...],
                 values: dict[str, FieldValue] | None = None) -> None:
        self.fields = [_encode(trt, s, None if values is None else values[s.name])
                       for s in specs]
        self.collection = trt.PluginFieldCollection(self.fields)
