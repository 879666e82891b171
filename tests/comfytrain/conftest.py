"""Plain-pytest access to the ComfyUI-free helpers under nodes/comfy_training (no ComfyUI installed)."""

from __future__ import annotations

import pytest

from tests.pack_import import pack_module


@pytest.fixture(scope="session")
def pure():
    return pack_module
