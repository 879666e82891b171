"""The single-photo view pipeline: buckets, face-safe crops, seeds, strength 0, caching, captions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from metalora_core.buckets import resize_center_crop
from metalora_core.errors import MetaLoRAError
from metalora_core.training.data import (
    AugmentConfig,
    cached_latents,
    caption,
    encode_views,
    face_loss_weights,
    make_views,
    photo_bucket,
    to_tensor,
)


@pytest.fixture(scope="module")
def photo():
    """A 300x200 landscape photo with structure (gradients + a bright 'face' square)."""
    yy, xx = np.mgrid[0:200, 0:300]
    img = np.stack([xx * 255 // 299, yy * 255 // 199, (xx + yy) * 255 // 498], -1).astype(np.uint8)
    img[60:120, 180:230] = 240
    return Image.fromarray(img)


FACE = (180.0, 60.0, 230.0, 120.0)


def test_bucket_follows_photo_aspect(photo):
    views = make_views(photo, n=2, resolution=256)
    assert views.bucket == photo_bucket(300, 200, 256) and views.bucket[0] > views.bucket[1]
    assert all(v.shape == (views.bucket[1], views.bucket[0], 3) and v.dtype == np.uint8 for v in views.images)
    assert photo_bucket(200, 300, 256) == views.bucket[::-1]
    assert photo_bucket(512, 512, 512) == (512, 512) and photo_bucket(1200, 800, 512) == (640, 384)


def test_face_box_always_inside_crops(photo):
    views = make_views(photo, n=24, resolution=256, face_box=FACE, seed=3)
    w, h = views.bucket
    assert len(views.face_boxes) == 24
    face_px = (FACE[2] - FACE[0]) * (FACE[3] - FACE[1])
    for img, (x0, y0, x1, y1) in zip(views.images, views.face_boxes):
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        # the whole face survived: its box is not clipped (area scaled like the view, aspect kept)
        assert (x1 - x0) / (y1 - y0) == pytest.approx(50 / 60, rel=0.05)
        # and the box marks the bright square, flipped or not
        inner = img[int(y0) + 2 : int(y1) - 2, int(x0) + 2 : int(x1) - 2].astype(float)
        assert inner.mean() > 180, inner.mean()
    scales = {round((b[2] - b[0]) * (b[3] - b[1]) / face_px, 3) for b in views.face_boxes}
    assert len(scales) > 5  # crops really vary in zoom


def test_deterministic_by_seed(photo):
    a = make_views(photo, n=6, resolution=256, face_box=FACE, seed=1)
    b = make_views(photo, n=6, resolution=256, face_box=FACE, seed=1)
    c = make_views(photo, n=6, resolution=256, face_box=FACE, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images)) and a.face_boxes == b.face_boxes
    assert not all(np.array_equal(x, y) for x, y in zip(a.images, c.images))
    assert len({x.tobytes() for x in a.images}) == 6  # views differ from each other


def test_strength_zero_is_no_augmentation(photo):
    views = make_views(photo, n=4, resolution=256, seed=5, augment=AugmentConfig(strength=0.0))
    assert all(np.array_equal(views.images[0], v) for v in views.images)
    plain = np.asarray(resize_center_crop(photo, views.bucket)).astype(float)
    assert np.abs(views.images[0].astype(float) - plain).mean() < 2.0
    strong = make_views(photo, n=4, resolution=256, seed=5)
    assert np.abs(strong.images[0].astype(float) - plain).mean() > 2.0


def test_face_weights_encode_once_and_cache(photo, tmp_path):
    views = make_views(photo, n=3, resolution=256, face_box=FACE, seed=0)
    masks = face_loss_weights(views, inside=3.0)
    w, h = views.bucket
    assert [tuple(m.shape) for m in masks] == [(1, h // 8, w // 8)] * 3
    assert all(set(m.unique().tolist()) == {1.0, 3.0} for m in masks)
    assert make_views(photo, n=1, resolution=256).face_boxes is None
    calls = []

    def encode(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        assert x.min() >= -1 and x.max() <= 1
        return torch.nn.functional.avg_pool2d(x, 8).repeat(1, 6, 1, 1)[:, :16]

    latents = cached_latents(tmp_path, "k", lambda: encode_views(views.images, encode, batch_size=2))
    assert calls == [2, 1] and len(latents) == 3 and tuple(latents[0].shape) == (16, h // 8, w // 8)
    again = cached_latents(tmp_path, "k", lambda: encode_views(views.images, encode))
    assert calls == [2, 1] and all(torch.equal(a, b) for a, b in zip(latents, again))
    assert torch.equal(
        to_tensor(views.images[:1])[0, :, 0, 0], torch.tensor(views.images[0][0, 0]) / 127.5 - 1
    )


def test_caption_and_errors(photo):
    assert caption("sks", "woman") == "photo of sks woman"
    assert caption("sks", "man", "{trigger}, a {class} in a garden") == "sks, a man in a garden"
    with pytest.raises(MetaLoRAError, match="template"):
        caption("sks", "man", "{name}")
    with pytest.raises(MetaLoRAError, match="outside"):
        make_views(photo, n=1, resolution=256, face_box=(400, 10, 500, 50))
    with pytest.raises(MetaLoRAError, match="multiple of 64"):
        make_views(photo, n=1, resolution=100)
