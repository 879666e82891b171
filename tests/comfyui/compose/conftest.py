"""In-process ComfyUI fixtures for the composition tests (shared with tests/comfyui/train)."""

import pytest

from tests.comfyui.train.conftest import comfy, load, pack, tiny_bfl, training_mode  # noqa: F401  (fixtures)


@pytest.fixture(autouse=True)
def _float64_rope(training_mode):  # noqa: F811
    """ComfyUI's torch RoPE (its comfy_kitchen kernels lack float64), as the training tests use."""
    yield
