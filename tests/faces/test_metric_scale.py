"""R-FaceSim's cosine is scale-free: embeddings need not be unit length (other face models, stored raw
embeddings), and the score must not change with their norms."""

from __future__ import annotations

import numpy as np
import pytest

from metalora_core.faces import r_facesim_from_embeddings


def test_scores_do_not_depend_on_embedding_norms():
    rng = np.random.default_rng(0)
    gen, refs, ref = rng.normal(size=(3, 8)), rng.normal(size=(4, 8)), rng.normal(size=8)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    plain = r_facesim_from_embeddings(list(unit(gen)), unit(refs), unit(ref))
    scales = np.array([[0.5], [3.0], [7.0], [0.1]])
    scaled = r_facesim_from_embeddings(list(unit(gen) * scales[:3]), unit(refs) * scales, 9.0 * unit(ref))
    assert scaled.score == pytest.approx(plain.score, abs=1e-12)
    assert scaled.per_image == pytest.approx(plain.per_image, abs=1e-12)
    assert scaled.facesim_ref == pytest.approx(plain.facesim_ref, abs=1e-12)
    assert scaled.diversity.face_distance == pytest.approx(plain.diversity.face_distance, abs=1e-12)
    by_hand = np.mean(unit(gen) @ unit(refs).T)
    assert plain.score == pytest.approx(by_hand, abs=1e-12)
