"""Detection, face choice, retries, alignment, embeddings and the cache, through the real insightface path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metalora_core.dev.tiny_faces import paint_markers
from metalora_core.faces import FaceAnalyzer, select_face, to_rgb_uint8

# t1.jpg is 1280 x 886: at det size 640 the scale is 0.5, so detector sides 128 / 64 / 32 are 256 / 128 / 64 px
T1_MARKERS = [((160, 160), 64), ((320, 128), 128), ((480, 160), 32)]


def test_t1_several_faces_largest_is_chosen(analyzer, t1):
    image = paint_markers(t1, T1_MARKERS)
    result = analyzer.analyze(image)
    assert result.n_faces == 3 and result.det_size == 640 and "3 faces found" in result.note
    np.testing.assert_allclose(result.face.bbox, [512, 128, 768, 384], atol=1.5)  # the 128 det-px marker
    assert [round(f.area / 1000) for f in result.faces] == [66, 16, 4]  # largest first
    second = analyzer.analyze(image, index=1).face
    np.testing.assert_allclose(second.bbox, [256, 256, 384, 384], atol=1.5)
    assert float(second.embedding @ result.face.embedding) < 0.99  # different faces, different embeddings
    missing = analyzer.analyze(image, index=3)
    assert missing.face is None and missing.n_faces == 3 and "only 3 found" in missing.note


def test_select_face_orders_by_area(analyzer, t1):
    faces = analyzer.analyze(paint_markers(t1, T1_MARKERS)).faces
    shuffled = [faces[2], faces[0], faces[1]]
    assert select_face(shuffled, 0) is faces[0] and select_face(shuffled, 2) is faces[2]
    assert select_face(shuffled, 5) is None


def test_single_face_astronaut(analyzer, astronaut):
    image = paint_markers(astronaut, [((288, 128), 128)])  # over her face; 1.25 det px per image px
    face = analyzer.face(image)
    assert face is not None
    np.testing.assert_allclose(face.bbox, [179.2, 51.2, 281.6, 153.6], atol=1.0)
    assert face.embedding.dtype == np.float32 and face.embedding.shape == (512,)
    assert abs(float(np.linalg.norm(face.embedding.astype(np.float64))) - 1) < 1e-5
    assert face.aligned.shape == (112, 112, 3) and face.aligned.dtype == np.uint8
    # the aligned crop is the inside of the box: its centre shows the real face pixels, not the marker
    centre = face.aligned[40:72, 40:72].reshape(-1, 3).astype(int)
    assert np.mean(np.abs(centre - [255, 0, 255]).sum(1) < 30) < 0.05


def test_retry_at_smaller_detection_size(analyzer):
    # a 256 px face in a 640 px image: too big for every anchor at 640, found once shown at 320
    image = paint_markers(np.full((640, 640, 3), 90, np.uint8), [((160, 160), 128)], det_size=320)
    single = FaceAnalyzer(analyzer.model, det_sizes=(640,))
    assert single.analyze(image).face is None
    result = analyzer.analyze(image)
    assert result.det_size == 320
    np.testing.assert_allclose(result.face.bbox, [192, 192, 448, 448], atol=1)


def test_tiny_16px_image(analyzer):
    result = analyzer.analyze(np.zeros((16, 16, 3), np.uint8))
    assert result.face is None and "too small" in result.note and "16x16" in result.note


def test_input_forms_give_the_same_embedding(analyzer, astronaut):
    rgb = paint_markers(astronaut, [((288, 128), 128)])
    ref = analyzer.face(rgb).embedding
    as_float = torch.from_numpy(rgb.astype(np.float32) / 255.0)[None]  # ComfyUI IMAGE (1, H, W, C)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], 2)
    for form in (as_float, rgba, rgb.astype(np.float64) / 255.0):
        np.testing.assert_allclose(analyzer.face(form).embedding, ref, atol=1e-6)
    # greyscale, 2-D and (H, W, 1): converted to RGB. The tiny detector only sees magenta, so a grey image
    # has no face for it ("no face" path); recognition on grey input is checked with the colour face's box.
    grey = rgb.mean(axis=2).astype(np.uint8)
    face = analyzer.face(rgb)
    stacked = analyzer.embed(np.stack([grey] * 3, 2), face).embedding.copy()
    assert float(stacked @ ref) < 0.999  # grey pixels really differ from colour ones
    for form in (grey, grey[:, :, None]):
        result = analyzer.analyze(form)
        assert result.face is None and "no face found" in result.note
        np.testing.assert_allclose(analyzer.embed(form, face).embedding, stacked, atol=1e-6)
    np.testing.assert_array_equal(analyzer.face(rgb).embedding, ref)  # embed() never alters the cached face


def test_greyscale_and_rgba_conversion_rules():
    grey = np.array([[0, 128], [255, 7]], np.uint8)
    assert to_rgb_uint8(grey).shape == (2, 2, 3) and (to_rgb_uint8(grey)[..., 1] == grey).all()
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = [10, 20, 30, 255]  # opaque: kept
    rgba[0, 1] = [10, 20, 30, 0]  # transparent: white
    assert to_rgb_uint8(rgba).tolist() == [[[10, 20, 30], [255, 255, 255]]]
    assert to_rgb_uint8(torch.tensor([[[0.5, 1.0, 0.0]]])).tolist() == [[[128, 255, 0]]]


def test_batch_and_embeddings_mark_faceless_rows(analyzer, astronaut):
    face = paint_markers(astronaut, [((288, 128), 128)])
    batch = torch.from_numpy(np.stack([face, astronaut, face]).astype(np.float32) / 255.0)  # (B, H, W, C)
    results = analyzer.analyze_batch(batch)
    assert [r.face is not None for r in results] == [True, False, True]
    embs, found = analyzer.embeddings(batch)
    assert embs.shape == (3, 512) and found.tolist() == [True, False, True]
    assert np.isnan(embs[1]).all() and np.allclose(embs[0], embs[2])


def test_cache_is_keyed_by_content(analyzer, astronaut):
    image = paint_markers(astronaut, [((288, 128), 128)])
    first = analyzer.analyze(image)
    assert analyzer.analyze(image.copy()) is first  # same pixels, cached
    changed = image.copy()
    changed[200, 200] ^= 1
    assert analyzer.analyze(changed) is not first


def test_bad_image_shapes_are_named(analyzer):
    from metalora_core.errors import MetaLoRAError

    with pytest.raises(MetaLoRAError, match="expected an image"):
        analyzer.analyze(np.zeros((4, 4, 2), np.uint8))


def test_fixed_size_detector_runs_at_its_size_only(face_root, tmp_path, astronaut):
    """A detector exported with a fixed 640 x 640 input (some SCRFD exports) must not be retried at 576."""
    import onnx

    from metalora_core.faces import load_analyzer

    folder = tmp_path / "insightface" / "models" / "fixed"
    folder.mkdir(parents=True)
    src = face_root / "insightface" / "models" / "tiny"
    det = onnx.load(str(src / "det_tiny.onnx"))
    dims = det.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value, dims[3].dim_value = 640, 640
    onnx.save(det, str(folder / "det_tiny.onnx"))
    (folder / "w600k_tiny.onnx").write_bytes((src / "w600k_tiny.onnx").read_bytes())
    fixed = load_analyzer(tmp_path, "fixed", providers=["CPUExecutionProvider"])
    assert fixed._inputs == [(640, 640)]
    result = fixed.analyze(astronaut)  # no face: would raise at 576 if retried
    assert result.face is None and "640" in result.note and "576" not in result.note
    assert fixed.face(paint_markers(astronaut, [((288, 128), 128)])) is not None
    with pytest.raises(ValueError, match="multiples of 32"):
        FaceAnalyzer(fixed.model, det_sizes=(600,))
