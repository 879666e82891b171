"""Aspect-ratio buckets (the community's scheme): sizes in 64-px steps up to a pixel budget; each image goes
to the bucket of nearest aspect ratio, is resized to cover it and centre-cropped, so non-square photos
train at their own shape instead of being squashed or padded."""

from __future__ import annotations

import math

from PIL import Image

STEP = 64


def make_buckets(
    resolution: int = 512, step: int = STEP, min_side: int = 256, max_side: int | None = None
) -> list[tuple[int, int]]:
    """All ``(width, height)`` in ``step`` multiples with ``w * h <= resolution**2``, each as large as allowed.

    For every width the tallest height within the budget is taken (and the transposes), so every bucket is
    close to the full pixel budget. Sorted by aspect ratio.
    """
    max_pixels = resolution * resolution
    max_side = max_side or resolution * 2
    buckets: set[tuple[int, int]] = set()
    width = min_side
    while width <= max_side:
        height = min(max_side, (max_pixels // width) // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets, key=lambda wh: (wh[0] / wh[1], wh[0]))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest on a log scale (so 2:1 and 1:2 are equally far from 1:1)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - aspect), -wh[0] * wh[1]))


def aspect_error(width: int, height: int, bucket: tuple[int, int]) -> float:
    """How far (in log aspect) an image is from a bucket; used to drop images no bucket fits."""
    return abs(math.log(width / height) - math.log(bucket[0] / bucket[1]))


def resize_center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover ``size`` (w, h) keeping aspect, then crop the centre: no stretching, no padding."""
    target_w, target_h = size
    scale = max(target_w / image.width, target_h / image.height)
    new_w, new_h = max(target_w, round(image.width * scale)), max(target_h, round(image.height * scale))
    resized = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    return resized.crop((left, top, left + target_w, top + target_h))
