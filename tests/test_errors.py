"""Every exception class of mixport is defined in mixport/errors.py (one place to read them all)."""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import mixport
from mixport import errors

PACKAGE = Path(mixport.__file__).parent
EXCEPTION_NAMES = {name for module in (errors, builtins) for name, obj in vars(module).items()
                   if isinstance(obj, type) and issubclass(obj, BaseException)}


def _base_names(node: ast.ClassDef) -> set[str]:
    return {b.id if isinstance(b, ast.Name) else b.attr for b in node.bases if isinstance(b, (ast.Name, ast.Attribute))}


def test_exception_classes_live_in_errors_py() -> None:
    outside = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and _base_names(node) & EXCEPTION_NAMES:
                outside.append(f"{path.relative_to(PACKAGE.parent)}: class {node.name}")
    assert not outside, "define these in mixport/errors.py:\n" + "\n".join(outside)


def test_the_family_is_printable_by_the_cli() -> None:
    """Every user-facing class is a MixportError (what / given / expected / hint, an exit code)."""
    family = [obj for obj in vars(errors).values() if isinstance(obj, type) and issubclass(obj, Exception)]
    assert {c.__name__ for c in family if not issubclass(c, errors.MixportError)} == {"NoMatch"}
    assert errors.CheckUnavailable("x").exit_code == 1 and errors.ParityError("x").exit_code == 3
    assert issubclass(errors.ParserSymlinkError, errors.BuildError)
