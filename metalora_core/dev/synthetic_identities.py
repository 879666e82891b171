"""A synthetic multi-identity photo set (no real people): each "identity" is a drawn figure with its own
colours and shape, shown with per-photo jitter at varied aspect ratios, so meta-training, bucketing and
the dataset checks run end to end in tests and demos."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (width, height) multipliers of ``size``: half square (every bucket set has 1:1, so at 128 px, where the next
# bucket is 1:3, half the photos still train), landscape, portrait, and a too-wide panorama
ASPECTS = ((1.0, 1.0), (1.25, 0.8), (1.0, 1.0), (0.8, 1.25), (1.0, 1.0), (1.5, 0.75))
CAPTIONS = ("photo of a person", "photo of a man", "photo of a woman")


def synthetic_photo(identity: int, index: int, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """One photo of ``identity``: its palette and face shape fixed, pose and background jittered."""
    who = np.random.default_rng([seed, identity])
    skin, hair, eyes = (tuple(int(c) for c in who.integers(40, 230, 3)) for _ in range(3))
    face_aspect = float(who.uniform(0.7, 1.1))
    shot = np.random.default_rng([seed, identity, index])
    w, h = size
    bg = tuple(int(c) for c in shot.integers(0, 255, 3))
    im = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(im)
    r = min(w, h) * float(shot.uniform(0.25, 0.35))
    cx, cy = w / 2 + float(shot.uniform(-0.1, 0.1)) * w, h / 2 + float(shot.uniform(-0.1, 0.1)) * h
    rx, ry = r * face_aspect, r
    draw.ellipse((cx - rx, cy - ry * 1.15, cx + rx, cy + ry * 0.2), fill=hair)
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=skin)
    for side in (-1, 1):
        ex, ey, er = cx + side * rx * 0.4, cy - ry * 0.15, r * 0.1
        draw.ellipse((ex - er, ey - er, ex + er, ey + er), fill=eyes)
    draw.arc((cx - rx * 0.4, cy + ry * 0.2, cx + rx * 0.4, cy + ry * 0.6), 20, 160, fill=hair, width=3)
    return im


def write_synthetic_identities(
    out: str | os.PathLike,
    identities: int = 4,
    images: int = 4,
    size: int = 128,
    seed: int = 0,
    captions: bool = True,
) -> Path:
    """``out/id_000/img_00.png`` ... with aspect ratios cycling through :data:`ASPECTS` (the last one too
    wide for the default buckets, so a check has something to drop) and, if ``captions``, a ``.txt`` beside
    every other photo."""
    out = Path(out)
    for i in range(identities):
        folder = out / f"id_{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(images):
            aw, ah = ASPECTS[(i + j) % len(ASPECTS)]
            photo = synthetic_photo(i, j, (round(size * aw), round(size * ah)), seed)
            photo.save(folder / f"img_{j:02d}.png")
            if captions and j % 2:
                (folder / f"img_{j:02d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)], encoding="utf-8")
    return out
