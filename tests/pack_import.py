"""Import the pack's ``nodes/`` modules in tests the way ComfyUI loads them: inside the pack's own package.

The node modules reach the library by relative import (``from ..metalora_core import ...``). Here the pack
root is an empty stand-in package, ``nodes/`` another (so no ``__init__`` side effects run), and
``<pack>.metalora_core.*`` resolves to the very ``metalora_core`` modules the tests import, so classes and
exceptions are shared (one ``MetaLoRAError``, one ``IdentityAdapter``). In a ComfyUI process the name
``nodes`` is ComfyUI's own nodes.py, another reason not to import ours as ``nodes``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK = "metalora_pack_stand_in"
_LIB = f"{PACK}.metalora_core"


class _SharedLibrary(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``<pack>.metalora_core.x`` -> the already importable ``metalora_core.x`` (same module object)."""

    def find_spec(self, name, path=None, target=None):
        if name == _LIB or name.startswith(_LIB + "."):
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return importlib.import_module(spec.name[len(PACK) + 1 :])

    def exec_module(self, module) -> None:
        return None


def pack_module(name: str):
    """Import ``nodes/<name>`` (dotted) of this repository inside the stand-in pack package."""
    if not any(isinstance(f, _SharedLibrary) for f in sys.meta_path):
        sys.meta_path.insert(0, _SharedLibrary())
    for pkg, path in ((PACK, REPO), (f"{PACK}.nodes", REPO / "nodes")):
        if pkg not in sys.modules:
            module = types.ModuleType(pkg)
            module.__path__ = [str(path)]
            sys.modules[pkg] = module
    return importlib.import_module(f"{PACK}.nodes.{name}")
