"""The tiny ONNX face models go through insightface's REAL routing, SCRFD decoding/NMS and ArcFace path."""

from __future__ import annotations

import numpy as np
import pytest
from insightface.app import FaceAnalysis
from insightface.model_zoo import model_zoo
from insightface.utils.face_align import arcface_dst

from metalora_core.cli.main import main
from metalora_core.dev.tiny_faces import DETECTOR_FILE, RECOGNIZER_FILE, paint_markers, write_tiny_face_models


def test_insightface_routes_tiny_models_like_real_ones(face_root):
    folder = face_root / "insightface" / "models" / "tiny"
    det = model_zoo.get_model(str(folder / DETECTOR_FILE), providers=["CPUExecutionProvider"])
    rec = model_zoo.get_model(str(folder / RECOGNIZER_FILE), providers=["CPUExecutionProvider"])
    assert type(det).__name__ == "SCRFD" and det.use_kps and det.fmc == 3 and det._num_anchors == 2
    assert len(det.output_names) == 9
    assert type(rec).__name__ == "ArcFaceONNX" and rec.input_size == (112, 112)
    assert len(rec.output_names) == 1 and rec.input_mean == 127.5


def test_face_analysis_get_finds_exactly_the_painted_faces():
    """FaceAnalysis.get (insightface's own loop) on three markers: one face each, exact boxes + keypoints."""
    import tempfile

    folder = write_tiny_face_models(tempfile.mkdtemp(), "t", seed=3)
    app = FaceAnalysis(
        name=str(folder), allowed_modules=["detection", "recognition"], providers=["CPUExecutionProvider"]
    )
    app.prepare(ctx_id=-1, det_size=(640, 640))
    img = paint_markers(
        np.full((640, 640, 3), 120, np.uint8), [((96, 96), 32), ((320, 320), 64), ((448, 128), 128)]
    )
    faces = sorted(app.get(np.ascontiguousarray(img[:, :, ::-1])), key=lambda f: f.bbox[0])
    boxes = [f.bbox.tolist() for f in faces]
    assert boxes == [[80, 80, 112, 112], [288, 288, 352, 352], [384, 64, 512, 192]]
    for f in faces:
        assert f.det_score > 0.99 and f.embedding.shape == (512,)
        x0, y0, x1, y1 = f.bbox
        expected = np.stack(
            [x0 + arcface_dst[:, 0] / 112 * (x1 - x0), y0 + arcface_dst[:, 1] / 112 * (y1 - y0)], 1
        )
        np.testing.assert_allclose(f.kps, expected, atol=1e-3)


def test_real_photos_without_markers_have_no_face(analyzer, t1, astronaut):
    for image in (t1, astronaut):
        result = analyzer.analyze(image)
        assert result.face is None and result.n_faces == 0 and "no face found" in result.note


def test_recognizer_is_deterministic_per_seed(tmp_path):
    a = write_tiny_face_models(tmp_path / "a", seed=1)
    b = write_tiny_face_models(tmp_path / "b", seed=1)
    c = write_tiny_face_models(tmp_path / "c", seed=2)
    read = lambda f: (f / RECOGNIZER_FILE).read_bytes()  # noqa: E731
    assert read(a) == read(b) and read(a) != read(c)


def test_dev_cli_builds_models(tmp_path, capsys):
    assert main(["dev", "tiny-face-models", "--out", str(tmp_path), "--name", "x"]) == 0
    assert sorted(p.name for p in (tmp_path / "insightface" / "models" / "x").iterdir()) == sorted(
        [DETECTOR_FILE, RECOGNIZER_FILE]
    )
    assert "written" in capsys.readouterr().out


def test_marker_box_rejects_off_grid():
    from metalora_core.dev.tiny_faces import marker_box

    with pytest.raises(ValueError):
        marker_box((640, 640), (100, 100), 64)
    with pytest.raises(ValueError):
        marker_box((640, 640), (96, 96), 48)
