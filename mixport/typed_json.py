"""Typed JSON: dataclasses read from parsed JSON with every value checked against its annotation.

``build(cls, data, prefix, where, error)`` makes a ``cls`` from a dict; the first value that is
not what the annotation says raises ``error(where, field, shown value, expected)`` (a one-line
MixportError in the caller's words). A dataclass with an ``extra: dict`` field keeps keys it
does not know there (written back by ``plain``), so a newer writer's fields survive a rewrite.
Supported annotations: str, int, float, bool, Any, X | None, unions, list[X], dict[str, X] and
nested dataclasses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
import typing
from collections.abc import Callable
from typing import Any

from mixport.errors import MixportError

Malformed = Callable[[str, str, str, str], MixportError]  # (where, field, shown value, expected)


def shown(value: object) -> str:
    if isinstance(value, (str, int, float, bool, type(None))):
        return json.dumps(value)[:60]
    return "an object" if isinstance(value, dict) else "a list" if isinstance(value, list) else type(value).__name__


def build(cls: type, data: dict[str, Any], prefix: str, where: str, error: Malformed) -> Any:
    """An instance of dataclass ``cls`` from ``data``, every value checked against its annotation
    (``error(where, field, shown, expected)`` raised for the first that is not)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "extra":
            continue
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], prefix + f.name, where, error)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise error(where, prefix + f.name, "missing", "present (a required field)")
    unknown = {k: v for k, v in data.items() if k not in names or k == "extra"}
    if unknown and "extra" not in names:
        raise error(where, prefix + next(iter(unknown)), "not a known field", ", ".join(sorted(names)))
    return cls(**kwargs, **({"extra": unknown} if unknown else {}))


def _convert(value: Any, hint: Any, name: str, where: str, error: Malformed) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own message (it may name a nested field)
            return _convert(value, options[0], name, where, error)
        for arg in options:
            with contextlib.suppress(MixportError):
                return _convert(value, arg, name, where, error)
        raise error(where, name, shown(value), " or ".join(_type_name(a) for a in args))
    if origin is list and isinstance(value, list):
        return [_convert(v, args[0], f"{name}[{i}]", where, error) for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        return {k: _convert(v, args[1], f"{name}.{k}", where, error) for k, v in value.items()}
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return build(hint, value, f"{name}.", where, error)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (str, bool) and isinstance(value, hint):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    raise error(where, name, shown(value), _type_name(hint))


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(hint):
        return "an object"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(hint, str(hint))


def plain(value: Any) -> Any:
    """Dataclasses -> dicts (None fields left out, ``extra`` merged back), recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)
               if f.name != "extra" and getattr(value, f.name) is not None}
        return {**out, **{k: v for k, v in getattr(value, "extra", {}).items() if k not in out}}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value
