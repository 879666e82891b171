"""Face-aware crops, soft masks and the trainer's face box."""

from __future__ import annotations

import numpy as np
import pytest

from metalora_core.dev.tiny_faces import paint_markers
from metalora_core.errors import MetaLoRAError
from metalora_core.faces import downsample_mask, expand_box, face_box, face_crop, loss_weights, soft_face_mask


def test_expand_box_margin_square_and_inside():
    # 100 x 50 box, margin 0.5 -> 200 x 100, squared -> 200 x 200 around centre (150, 125)
    assert expand_box((100, 100, 200, 150), 0.5, (1000, 1000), aspect=1.0) == (50, 25, 250, 225)
    # near the corner: slid inside, not padded
    assert expand_box((0, 0, 40, 40), 0.5, (1000, 1000), aspect=1.0) == (0, 0, 80, 80)
    # aspect None keeps the grown box's own aspect; aspect 2 is twice as wide as high
    assert expand_box((100, 100, 200, 150), 0.0, (1000, 1000), aspect=None) == (100, 100, 200, 150)
    x0, y0, x1, y1 = expand_box((100, 100, 200, 150), 0.0, (1000, 1000), aspect=2.0)
    assert (x1 - x0, y1 - y0) == (100, 50)
    # larger than the image: shrunk keeping the aspect, then placed inside
    assert expand_box((0, 0, 300, 300), 1.0, (200, 400), aspect=1.0) == (50, 0, 250, 200)  # centred on x=150
    with pytest.raises(MetaLoRAError, match="empty"):
        expand_box((10, 10, 5, 20), 0.5, (100, 100))


def test_face_crop_resizes_and_maps_the_face():
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    crop = face_crop(image, (150, 100, 250, 200), margin=0.5, aspect="square", size=128)
    assert crop.box == (100, 50, 300, 250) and crop.image.shape == (128, 128, 3)  # 100 px + 50 % per side
    assert crop.scale == pytest.approx((128 / 200, 128 / 200))
    np.testing.assert_allclose(crop.face_box, np.array([50, 50, 150, 150]) * 128 / 200)
    assert crop.mask.shape == (128, 128) and crop.mask[64, 64] == 1.0 and crop.mask[0, 0] == 0.0
    full = face_crop(image, (150, 100, 250, 200), margin=0.0, aspect=None)
    assert (full.image == image[100:200, 150:250]).all()  # no resize: exact pixels
    wide = face_crop(image, (150, 100, 250, 200), margin=0.2, aspect="image", size=(200, 150))
    assert wide.image.shape == (150, 200, 3)
    with pytest.raises(MetaLoRAError, match="aspect"):
        face_crop(image, (150, 100, 250, 200), aspect="round")


def test_soft_mask_values():
    mask = soft_face_mask((100, 200), (50, 25, 150, 75), feather=0.5)
    assert mask.dtype == np.float32 and mask.min() >= 0 and mask.max() <= 1
    assert mask[50, 100] == 1.0 and mask[0, 0] == 0.0  # centre / far corner
    # on the horizontal axis: 1 inside the ellipse (x < 150), cosine fall-off to 0 at r = 1.5 (x = 175)
    row = mask[50]
    assert row[149] == 1.0 and 0 < row[160] < 1 and row[176] == 0.0
    r = np.hypot((160.5 - 100) / 50, (50.5 - 50) / 25)  # pixel centres, ellipse radii 50 x 25
    assert row[160] == pytest.approx(0.5 * (1 + np.cos(np.pi * (r - 1) / 0.5)), abs=1e-6)
    assert np.all(np.diff(row[100:]) <= 1e-7)  # monotone away from the centre
    hard = soft_face_mask((100, 200), (50, 25, 150, 75), feather=0)
    assert set(np.unique(hard)) == {0.0, 1.0}


def test_loss_weights_and_downsample():
    mask = np.zeros((16, 16), np.float32)
    mask[:8] = 1
    w = loss_weights(mask, face_weight=3.0, background=1.0)
    assert w.mean() == pytest.approx(1.0) and w[0, 0] / w[15, 15] == pytest.approx(3.0)
    small = downsample_mask(np.arange(64, dtype=np.float32).reshape(8, 8), 4)
    assert small.tolist() == [[13.5, 17.5], [45.5, 49.5]]
    with pytest.raises(MetaLoRAError):
        downsample_mask(np.ones((4, 4)), 8)


def test_face_box_for_the_trainer(analyzer, astronaut):
    image = paint_markers(astronaut, [((288, 128), 128)])
    assert face_box(image, analyzer) == (179, 51, 282, 154)
    grown = face_box(image, analyzer, margin=0.25)
    assert grown[0] < 179 and grown[2] > 282 and grown[1] == 25
    assert face_box(astronaut, analyzer) is None  # no face


def test_crop_batch_faceless_modes_and_report():
    from metalora_core.faces import crop_batch, whole_image_crop

    rng = np.random.default_rng(1)
    face, faceless = (rng.integers(0, 256, (300, 400, 3), dtype=np.uint8) for _ in range(2))

    def find(rgb):  # a face in the first image only (keyed by content: rgb is a converted copy)
        return (150, 100, 250, 200) if np.array_equal(rgb, face) else None

    whole = whole_image_crop(faceless, 64)
    assert whole.box == (50, 0, 350, 300) and whole.image.shape == (64, 64, 3)  # the centre square
    assert not whole.mask.any()
    kept = crop_batch([face, faceless], find, 0.5, 64, "whole image")
    assert kept.sources == [0, 1] and kept.faceless == [1]
    assert kept.crops[0].mask.max() == 1.0 and not kept.crops[1].mask.any()
    np.testing.assert_array_equal(kept.crops[1].image, whole.image)
    assert kept.report == "1 of 2 images had a face. No face in image(s) 1 (whole image, zero mask)."
    skipped = crop_batch([faceless, face], find, 0.5, 64, "skip")
    assert skipped.sources == [1] and len(skipped.crops) == 1 and skipped.crops[0].mask.max() == 1.0
    assert skipped.report == "1 of 2 images had a face. No face in image(s) 0 (skipped)."
    none = crop_batch([faceless, faceless], find, 0.5, 64, "skip")  # a batch cannot be empty
    assert none.sources == [0, 1] and not any(c.mask.any() for c in none.crops)
    assert "0 of 2" in none.report and "No image had a face" in none.report
    with pytest.raises(MetaLoRAError, match="image 1 of the batch has no detectable face"):
        crop_batch([face, faceless], find, 0.5, 64, "error")
    with pytest.raises(MetaLoRAError, match="if_no_face"):
        crop_batch([face], find, 0.5, 64, "ignore")
