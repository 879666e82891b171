"""Import the repository root as a package (as ComfyUI does with a custom-node folder), without ComfyUI."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACK = "metalora_pack_under_test"


def import_pack():
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACK, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK]


@pytest.fixture(scope="session")
def pack():
    """The pack's root module; ``pack_module("nodes.comfy_model.patch_math")`` imports a submodule relative to it."""
    return import_pack()


@pytest.fixture(scope="session")
def pack_module(pack):
    return lambda name: importlib.import_module(f"{PACK}.{name}")
