"""Fixtures for the faces tests: tiny ONNX face models (built once), an analyzer, real photos."""

from __future__ import annotations

import os

import numpy as np
import pytest

from metalora_core.dev.tiny_faces import write_tiny_face_models


@pytest.fixture(scope="session")
def face_root(tmp_path_factory):
    """A models root holding insightface/models/tiny/ (detector + recognizer)."""
    root = tmp_path_factory.mktemp("face_models")
    write_tiny_face_models(root, "tiny", seed=0)
    return root


@pytest.fixture(scope="session")
def analyzer(face_root):
    from metalora_core.faces import load_analyzer

    return load_analyzer(face_root, "tiny", providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def t1() -> np.ndarray:
    """insightface's bundled group photo (1280 x 886, six people), RGB."""
    import insightface

    from metalora_core.faces import load_image

    return load_image(os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg"))


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """scikit-image's astronaut (512 x 512, one face), RGB."""
    from skimage.data import astronaut as load

    return load()
