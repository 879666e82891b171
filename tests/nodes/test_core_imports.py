"""The nodes import ComfyUI, so CI (no ComfyUI) cannot import them. This checks statically that every name
they take from metalora_core still exists, so a library change cannot silently break the pack."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

NODES = Path(__file__).resolve().parents[2] / "nodes"


def _core_imports() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted(NODES.rglob("*.py")):
        package = ".".join(path.relative_to(NODES.parent).with_suffix("").parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                if module.startswith("metalora_core"):
                    found += [
                        (str(path.relative_to(NODES.parent)), module, alias.name) for alias in node.names
                    ]
    return found


IMPORTS = _core_imports()


def test_nodes_take_names_from_the_library():
    assert len(IMPORTS) > 10, "the nodes should be thin wrappers over metalora_core"


@pytest.mark.parametrize("where, module, name", IMPORTS, ids=[f"{w}:{n}" for w, _, n in IMPORTS])
def test_every_library_name_the_nodes_import_exists(where, module, name):
    imported = importlib.import_module(module)
    assert hasattr(imported, name) or importlib.util.find_spec(f"{module}.{name}"), (
        f"{where} imports {module}.{name}, which no longer exists"
    )
