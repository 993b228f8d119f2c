"""The stages import downward only: the import graph of ``mixport/`` has no edge up the data flow.

Every import counts, the lazy ones inside functions too: a cycle hidden in a function body is
still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mixport"

# Lowest first: a module may import its own stage and the stages before it, never one after.
STAGES = ("core", "models", "passes", "exporter", "plugins", "engine", "runtime", "tools", "serve", "cli")
CORE = ("__init__", "errors", "ops", "quant", "artifact", "onnx_io", "progress", "staging", "typed_json",
        "config_fields", "folder_check")


def stage_of(module: str) -> str:
    """``mixport.a.b`` -> its stage name (a root module is core, except the CLI)."""
    parts = module.split(".")
    if parts[0] != "mixport":
        raise ValueError(module)
    if len(parts) == 1 or parts[1] in CORE:
        return "core"
    if parts[1] == "cli":
        return "cli"
    if parts[1] not in STAGES:
        raise AssertionError(f"{module}: a top-level module that belongs to no stage (add it to STAGES or CORE)")
    return parts[1]


def module_name(path: Path, package: Path) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every ``mixport...`` import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "mixport"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "mixport":
            if node.module == "mixport":  # from mixport import artifact, engine ...
                found += [(node.lineno, f"mixport.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; mixport uses absolute imports")
    return found


def upward_edges(package: Path) -> list[str]:
    rank = {name: i for i, name in enumerate(STAGES)}
    bad = []
    for path in sorted(package.rglob("*.py")):
        src = stage_of(module_name(path, package))
        for line, target in imported_modules(path):
            dst = stage_of(target)
            if rank[dst] > rank[src]:
                bad.append(f"{path.relative_to(package.parent)}:{line}: {src} imports {target} ({dst})")
    return bad


def test_stages_import_downward_only() -> None:
    assert upward_edges(PACKAGE) == []


def test_every_package_folder_is_a_stage() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders <= set(STAGES), f"unplaced packages: {sorted(folders - set(STAGES))}"
    assert "build" not in folders  # pytest and packaging tools skip folders named build


def test_the_check_finds_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a passes module importing the runtime is reported, with its line."""
    pkg = tmp_path / "mixport"
    (pkg / "passes").mkdir(parents=True)
    (pkg / "runtime").mkdir()
    for init in (pkg / "__init__.py", pkg / "passes" / "__init__.py", pkg / "runtime" / "__init__.py"):
        init.write_text("")
    (pkg / "runtime" / "api.py").write_text("from mixport.passes import run_passes\n")
    (pkg / "passes" / "bad.py").write_text("def f():\n    from mixport.runtime import api\n")
    assert upward_edges(pkg) == ["mixport/passes/bad.py:2: passes imports mixport.runtime (runtime)"]
    (pkg / "passes" / "bad.py").write_text("from . import x\n")
    with pytest.raises(AssertionError, match="relative import"):
        upward_edges(pkg)
