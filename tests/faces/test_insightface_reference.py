"""Our face pipeline feeds the detector and the recognition model exactly what insightface's own
``FaceAnalysis.get`` feeds them (BGR channel order, its 5-point alignment, its normalisation), pinned
against insightface itself on the same image with the same tiny models, not against our own code. A swapped
convention would silently lower every R-FaceSim; here it fails. The percentage then follows the model's
documented threshold, or the one given.
"""

from __future__ import annotations

import numpy as np
import pytest
from insightface.app import FaceAnalysis

from metalora_core.dev.tiny_faces import paint_markers
from metalora_core.faces import load_analyzer
from metalora_core.faces.metrics import r_facesim_from_embeddings, threshold_for

MARKERS = [((160, 192), 64), ((448, 384), 128)]


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    """Two painted faces on a background whose three channels differ (so RGB and BGR are not alike)."""
    yy, xx = np.mgrid[0:640, 0:640]
    rgb = np.stack([(xx * 0.35) % 256, (yy * 0.3 + 40) % 256, ((xx + yy) * 0.1 + 90) % 256], -1)
    return paint_markers(rgb.astype(np.uint8), MARKERS)


@pytest.fixture(scope="module")
def reference(face_root, scene):
    """insightface's own loop: FaceAnalysis over the same model folder, given BGR as it expects."""
    app = FaceAnalysis(
        name="tiny",
        root=str(face_root / "insightface"),
        allowed_modules=["detection", "recognition"],
        providers=["CPUExecutionProvider"],
    )
    app.prepare(ctx_id=-1, det_size=(640, 640), det_thresh=0.5)
    faces = app.get(np.ascontiguousarray(scene[:, :, ::-1]))
    assert len(faces) == len(MARKERS), "the reference must see every painted face"
    return sorted(faces, key=lambda f: -(f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))  # largest first


def test_boxes_keypoints_and_embeddings_equal_insightfaces_own(face_root, scene, reference):
    analyzer = load_analyzer(face_root, "tiny", providers=["CPUExecutionProvider"], det_sizes=(640,))
    for index, theirs in enumerate(reference):
        ours = analyzer.analyze(scene, index).face
        np.testing.assert_allclose(ours.bbox, theirs.bbox, atol=1e-3)
        np.testing.assert_allclose(ours.kps, theirs.kps, atol=1e-3)
        np.testing.assert_allclose(ours.embedding, theirs.normed_embedding, atol=1e-5)
    # the check can fail: the other channel order gives another embedding for the same face
    swapped = load_analyzer(face_root, "tiny", providers=["CPUExecutionProvider"], det_sizes=(640,))
    other = swapped.analyze(np.ascontiguousarray(scene[:, :, ::-1])).face
    assert float(other.embedding @ reference[0].normed_embedding) < 0.999


def test_percent_follows_the_models_threshold_or_the_given_one():
    unit = np.array([1.0, 0.0], np.float32)
    at = lambda cos: np.array([cos, (1 - cos**2) ** 0.5], np.float32)  # noqa: E731
    refs = np.stack([unit])
    t = threshold_for("buffalo_l")
    default = r_facesim_from_embeddings([at(t)], refs, model="buffalo_l")
    assert default.threshold == t and default.percent == pytest.approx(50.0, abs=1e-4)
    given = r_facesim_from_embeddings([at(t)], refs, model="buffalo_l", threshold=0.6)
    assert given.threshold == 0.6 and given.percent == pytest.approx(50.0 * t / 0.6, abs=1e-4)
    above = at(t + 0.05)
    assert r_facesim_from_embeddings([above], refs, model="buffalo_l").verdict == "same person"
    assert (
        r_facesim_from_embeddings([above], refs, model="buffalo_l", threshold=0.6).verdict
        == "different person"
    )


def test_the_detector_is_fed_what_face_analysis_feeds_it(face_root, scene, monkeypatch):
    """The tiny detector looks at marker shapes only, so a channel swap would not change its boxes: the
    image it is handed is compared instead, ours against insightface's FaceAnalysis.get."""
    from insightface.model_zoo.scrfd import SCRFD

    seen: list[np.ndarray] = []
    real = SCRFD.detect

    def spy(self, img, *args, **kwargs):
        seen.append(np.array(img, copy=True))
        return real(self, img, *args, **kwargs)

    monkeypatch.setattr(SCRFD, "detect", spy)
    app = FaceAnalysis(
        name="tiny",
        root=str(face_root / "insightface"),
        allowed_modules=["detection", "recognition"],
        providers=["CPUExecutionProvider"],
    )
    app.prepare(ctx_id=-1, det_size=(640, 640))
    seen.clear()
    app.get(np.ascontiguousarray(scene[:, :, ::-1]))  # insightface's contract: a cv2 (BGR) image
    theirs = seen.pop()
    load_analyzer(face_root, "tiny", providers=["CPUExecutionProvider"], det_sizes=(640,)).analyze(scene)
    ours = seen.pop()
    assert np.array_equal(ours, theirs)
