"""Aspect-ratio buckets against brute force: every bucket fills the pixel budget in 64 px steps, both
orientations exist, a photo goes to the bucket of nearest log aspect, and the crop is centred."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from metalora_core.buckets import make_buckets, nearest_bucket, resize_center_crop


@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_buckets_are_maximal_in_budget_and_come_in_both_orientations(resolution):
    buckets = make_buckets(resolution, min_side=256 if resolution > 256 else 128)
    budget, max_side = resolution * resolution, 2 * resolution
    assert len(set(buckets)) == len(buckets) >= 3
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= budget and max(w, h) <= max_side
        assert (h, w) in buckets  # portrait and landscape alike
        taller, wider = w * (h + 64) > budget or h + 64 > max_side, (w + 64) * h > budget or w + 64 > max_side
        assert taller or wider  # it cannot grow by a step in both directions: it fills the budget
    assert (resolution, resolution) in buckets
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (1200, 800), (640, 1600), (500, 499), (4000, 1000)])
def test_nearest_bucket_is_the_brute_force_nearest_log_aspect(size):
    buckets = make_buckets(512)
    got = nearest_bucket(*size, buckets)
    errors = {b: abs(math.log(b[0] / b[1]) - math.log(size[0] / size[1])) for b in buckets}
    assert errors[got] == pytest.approx(min(errors.values()), abs=1e-12)
    assert (got[0] >= got[1]) == (size[0] >= size[1]) or errors[got] < 1e-9


@pytest.mark.parametrize("size, target", [((300, 120), (128, 128)), ((90, 300), (64, 128))])
def test_resize_center_crop_keeps_the_centre(size, target):
    """A mirror-symmetric image stays mirror-symmetric only if the crop is centred."""
    w, h = size
    xx, yy = np.meshgrid(np.abs(np.arange(w) - (w - 1) / 2), np.abs(np.arange(h) - (h - 1) / 2))
    img = np.stack([xx * 255 / xx.max(), yy * 255 / yy.max(), (xx + yy) * 127 / (xx + yy).max()], -1)
    out = np.asarray(resize_center_crop(Image.fromarray(img.astype(np.uint8)), target), np.float64)
    assert out.shape == (target[1], target[0], 3)
    assert np.abs(out - out[:, ::-1]).mean() < 2.0 and np.abs(out - out[::-1]).mean() < 2.0
