"""Optimization-profile shapes for every dynamic network input.

Rules, first match wins, per dynamic axis:
  1. ``ProfileSpec.shapes[input]``: explicit (min, opt, max) shapes for that input;
  2. KV-cache LLM inputs, by name and position (B batch, S new tokens, P past):
     input_ids / position_ids [B, S], attention_mask [B, P+S],
     past_key_values.{i}.key / .value [B, KVH, P, D];
  3. the ONNX dim_param of that axis looked up in ``ProfileSpec.dims``
     (batch / seq / past and their long names are known by default).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mixport.errors import BuildError

Range = tuple[int, int, int]  # (min, opt, max)
Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]

_PAST_KV = re.compile(r"^past_key_values\.\d+\.(key|value)$")
_ROLE_ALIASES = {"batch_size": "batch", "sequence_length": "seq", "seq_len": "seq",
                 "past_sequence_length": "past", "past_seq_len": "past"}


@dataclass(frozen=True)
class ProfileSpec:
    """min/opt/max for batch, new tokens (seq) and cached tokens (past), plus overrides."""

    batch: Range = (1, 1, 4)
    seq: Range = (1, 64, 256)
    past: Range = (0, 256, 1024)
    dims: Mapping[str, Range] = field(default_factory=dict)  # ONNX dim_param -> range
    shapes: Mapping[str, ShapeRange] = field(default_factory=dict)  # input -> shapes

    def role_range(self, role: str) -> Range | None:
        """The range for a role ("batch", "seq", "past", "total") or a dim_param name."""
        if role in self.dims:
            return tuple(self.dims[role])  # type: ignore[return-value]
        role = _ROLE_ALIASES.get(role, role)
        if role == "total":
            return tuple(p + s for p, s in zip(self.past, self.seq, strict=True))  # type: ignore[return-value]
        return {"batch": self.batch, "seq": self.seq, "past": self.past}.get(role)

    def check(self) -> None:
        for name, rng in [("batch", self.batch), ("seq", self.seq), ("past", self.past),
                          *self.dims.items()]:
            lo, opt, hi = rng
            if not 0 <= lo <= opt <= hi:
                raise BuildError(f"bad profile range for {name}", given=rng,
                                 expected="0 <= min <= opt <= max")


def llm_role(name: str, axis: int) -> str | None:
    """The role of ``axis`` of a KV-cache LLM input, or None when the name is not one."""
    if name in ("input_ids", "position_ids"):
        return ("batch", "seq")[axis] if axis < 2 else None
    if name == "attention_mask":
        return ("batch", "total")[axis] if axis < 2 else None
    if _PAST_KV.match(name):
        return {0: "batch", 2: "past"}.get(axis)
    return None


def _axis_range(spec: ProfileSpec, name: str, axis: int, dim_param: str | None) -> Range:
    for role in (llm_role(name, axis), dim_param):
        rng = spec.role_range(role) if role else None
        if rng is not None:
            return rng
    raise BuildError(
        f"no profile range for dynamic axis {axis} of input {name!r}",
        given=f"dim_param={dim_param!r}", expected="a known LLM input, or a range for it",
        hint=f"pass ProfileSpec(dims={{{dim_param or 'name'!r}: (min, opt, max)}}) "
             f"or ProfileSpec(shapes={{{name!r}: (min_shape, opt_shape, max_shape)}})")


def input_shapes(spec: ProfileSpec, name: str, shape: Sequence[int],
                 dim_params: Sequence[str | None]) -> ShapeRange:
    """(min, opt, max) shapes for one network input (``-1`` marks dynamic axes)."""
    if name in spec.shapes:
        lo, opt, hi = (tuple(int(d) for d in s) for s in spec.shapes[name])
        return lo, opt, hi
    per_axis = []
    for axis, dim in enumerate(shape):
        if dim >= 0:
            per_axis.append((dim, dim, dim))
        else:
            param = dim_params[axis] if axis < len(dim_params) else None
            per_axis.append(_axis_range(spec, name, axis, param))
    lo, opt, hi = (tuple(r[i] for r in per_axis) for i in range(3))
    return lo, opt, hi
