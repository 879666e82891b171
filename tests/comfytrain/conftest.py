"""Plain-pytest access to the ComfyUI-free helpers under nodes/comfy_training (no ComfyUI installed).

``nodes/__init__.py`` is the ComfyUI side and may import ComfyUI, so the package is reached through an
empty stand-in for ``nodes`` instead of being imported.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ALIAS = "metalora_nodes_pure"


@pytest.fixture(scope="session")
def pure():
    def load(name: str):
        if ALIAS not in sys.modules:
            stand_in = types.ModuleType(ALIAS)
            stand_in.__path__ = [str(REPO / "nodes")]
            sys.modules[ALIAS] = stand_in
        return importlib.import_module(f"{ALIAS}.{name}")

    return load
