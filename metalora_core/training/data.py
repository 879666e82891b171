"""One photo -> N augmented training views at the photo's own aspect bucket, encoded once.

Every view is a random crop of the photo with the bucket's aspect ratio (so non-square photos train at
their own shape; nearest aspect bucket in 64-px steps, :mod:`metalora_core.buckets`), resized to the
bucket, then albumentations applies flip and mild photometric / degradation noise. Given a face box, every
crop keeps the whole face inside (a crop that cuts the face teaches the adapter half an identity).

One knob, ``strength`` (0..1+), scales every probability and magnitude below; ``strength = 0`` gives N
copies of the plain crop (centred, or centred on the face if a box is given). Defaults (at strength 1) and why:

=================  =========================  =========================================================
crop area          60-100 % of the largest    zoom variety without losing the face; the face box always
                   window of bucket aspect    stays inside
horizontal flip    p = 0.5                    doubles pose variety from one photo (faces are nearly
                                              symmetric; set ``flip_p = 0`` for asymmetric features)
colour jitter      p = 0.8; brightness,       mild: lighting changes, never a different skin tone
                   contrast, saturation
                   +-10 %, hue +-0.02
Gaussian blur      p = 0.1, kernel 3-5        the adapter must not learn the photo's sharpness
Gaussian noise     p = 0.1, std 1-3 %         ... nor its sensor noise
JPEG artefacts     p = 0.2, quality 70-95     ... nor its compression blocks
=================  =========================  =========================================================
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..buckets import make_buckets, nearest_bucket
from ..errors import MetaLoRAError
from ..safeio import load_tensors, save_tensors

DEFAULT_CAPTION = "photo of {trigger} {class}"
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


def caption(trigger: str = "ohwx", subject_class: str = "person", template: str = DEFAULT_CAPTION) -> str:
    """The training prompt: ``template`` with ``{trigger}`` and ``{class}`` filled in."""
    try:
        return template.format_map({"trigger": trigger, "class": subject_class})
    except (KeyError, IndexError, ValueError) as exc:
        raise MetaLoRAError(
            f"caption template '{template}' is not valid ({exc}); use {{trigger}} and {{class}} only"
        ) from None


@dataclass
class AugmentConfig:
    """Augmentation settings at ``strength = 1`` (see the module table for the reasons)."""

    strength: float = 1.0
    crop_min_area: float = 0.6
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02
    blur_p: float = 0.1
    noise_p: float = 0.1
    noise_std: tuple[float, float] = (0.01, 0.03)
    jpeg_p: float = 0.2
    jpeg_quality: tuple[int, int] = (70, 95)

    def __post_init__(self) -> None:
        if self.strength < 0:
            raise MetaLoRAError(f"augmentation strength must be >= 0, got {self.strength}")


@dataclass
class Views:
    """``images``: uint8 ``(H, W, 3)`` views, all of size ``bucket = (width, height)``; face boxes per view."""

    images: list[np.ndarray]
    bucket: tuple[int, int]
    face_boxes: list[Box] | None


def albumentations():
    """albumentations, imported with its update check off: it asks PyPI at import otherwise (a delay and a
    warning offline), and the pack never reaches for the network. A user's own setting is kept."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations

    return albumentations


def photometric(aug: AugmentConfig, seed: int):
    """The albumentations pipeline after cropping (flip moves the face box along; ``pascal_voc`` boxes)."""
    A = albumentations()

    s = aug.strength

    def p(x: float) -> float:
        return min(1.0, x * s)

    def around_one(x: float) -> tuple[float, float]:
        return (max(0.0, 1 - x * s), 1 + x * s)

    lo, hi = aug.jpeg_quality
    quality = (max(1, round(100 - (100 - lo) * s)), max(1, round(100 - (100 - hi) * s)))
    transforms = [
        A.HorizontalFlip(p=p(aug.flip_p)),
        A.ColorJitter(
            brightness=around_one(aug.brightness),
            contrast=around_one(aug.contrast),
            saturation=around_one(aug.saturation),
            hue=(-min(0.5, aug.hue * s), min(0.5, aug.hue * s)),
            p=p(aug.jitter_p),
        ),
        A.GaussianBlur(blur_limit=(3, 5), p=p(aug.blur_p)),
        A.GaussNoise(std_range=(aug.noise_std[0] * s, aug.noise_std[1] * s), p=p(aug.noise_p)),
        A.ImageCompression(quality_range=quality, p=p(aug.jpeg_p)),
    ]
    bbox = A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True)
    return A.Compose(transforms, bbox_params=bbox, seed=seed)


def _check_box(box: Box, width: int, height: int) -> Box:
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)
    if x1 <= x0 or y1 <= y0:
        raise MetaLoRAError(f"face box {tuple(box)} lies outside the {width}x{height} photo")
    return x0, y0, x1, y1


def crop_window(
    width: int, height: int, aspect: float, area: float, face: Box | None, rng: np.random.Generator | None
) -> Box:
    """A window of ``aspect`` (w/h) covering ``area`` of the largest such window, holding ``face`` if given.

    Without ``rng`` the window is centred (on the face if there is one).
    """
    max_w = min(float(width), height * aspect)
    max_h = max_w / aspect
    w, h = max_w * math.sqrt(area), max_h * math.sqrt(area)
    if face is not None:  # grow until the face fits (never beyond the largest window)
        grow = max(1.0, (face[2] - face[0]) / w, (face[3] - face[1]) / h)
        w, h = min(max_w, w * grow), min(max_h, h * grow)

    def place(lo_img: float, size: float, span: float, f0: float | None, f1: float | None) -> float:
        lo, hi = 0.0, span - size
        if f0 is not None and f1 is not None and f1 - f0 <= size:
            lo, hi = max(lo, f1 - size), min(hi, f0)
        if rng is None:
            centre = (span - size) / 2 if f0 is None else (f0 + f1) / 2 - size / 2  # type: ignore[operator]
            return min(max(centre, lo), hi)
        return float(rng.uniform(lo, hi)) if hi > lo else lo

    fx0, fy0, fx1, fy1 = face if face is not None else (None, None, None, None)
    x = place(0.0, w, float(width), fx0, fx1)
    y = place(0.0, h, float(height), fy0, fy1)
    return x, y, x + w, y + h


def photo_bucket(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The ``(w, h)`` bucket for a photo: nearest aspect among the ``resolution``-budget buckets."""
    min_side = min(256, max(64, resolution // 2))
    return nearest_bucket(width, height, make_buckets(resolution, min_side=min_side))


def make_views(
    image: Image.Image | np.ndarray,
    n: int = 16,
    resolution: int = 512,
    face_box: Box | None = None,
    seed: int = 0,
    augment: AugmentConfig | None = None,
) -> Views:
    """``n`` augmented uint8 views of one photo at its aspect bucket; deterministic for a seed."""
    if n < 1:
        raise MetaLoRAError(f"need at least one view, got n={n}")
    if resolution < 64 or resolution % 64:
        raise MetaLoRAError(f"resolution must be a multiple of 64 (>= 64), got {resolution}")
    aug = augment or AugmentConfig()
    photo = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    photo = photo.convert("RGB")
    face = None if face_box is None else _check_box(face_box, photo.width, photo.height)
    bucket = photo_bucket(photo.width, photo.height, resolution)
    aspect = bucket[0] / bucket[1]
    rng = np.random.default_rng(seed)
    pipeline = photometric(aug, seed) if aug.strength > 0 else None
    min_area = max(0.05, 1.0 - aug.strength * (1.0 - aug.crop_min_area))
    images, boxes = [], []
    for _ in range(n):
        if pipeline is None:
            window = crop_window(photo.width, photo.height, aspect, 1.0, face, None)
        else:
            window = crop_window(photo.width, photo.height, aspect, rng.uniform(min_area, 1.0), face, rng)
        view = np.asarray(photo.resize(bucket, Image.Resampling.LANCZOS, box=window))
        sx, sy = bucket[0] / (window[2] - window[0]), bucket[1] / (window[3] - window[1])
        view_box = (
            None
            if face is None
            else _check_box(
                (
                    (face[0] - window[0]) * sx,
                    (face[1] - window[1]) * sy,
                    (face[2] - window[0]) * sx,
                    (face[3] - window[1]) * sy,
                ),
                *bucket,
            )
        )
        if pipeline is not None:
            out = pipeline(image=view, bboxes=[view_box] if view_box else [], labels=[0] if view_box else [])
            view = out["image"]
            view_box = tuple(float(v) for v in out["bboxes"][0]) if view_box else None  # type: ignore[assignment]
        images.append(np.ascontiguousarray(view, dtype=np.uint8))
        boxes.append(view_box)
    return Views(images, bucket, boxes if face is not None else None)  # type: ignore[arg-type]


def face_loss_weights(
    views: Views, factor: int = 8, inside: float = 2.0, outside: float = 1.0
) -> list[torch.Tensor] | None:
    """Per-view loss masks ``(1, H / factor, W / factor)`` at latent size: ``inside`` on the face box."""
    if views.face_boxes is None:
        return None
    w, h = views.bucket[0] // factor, views.bucket[1] // factor
    masks = []
    for x0, y0, x1, y1 in views.face_boxes:
        m = torch.full((1, h, w), float(outside))
        m[:, int(y0 // factor) : math.ceil(y1 / factor), int(x0 // factor) : math.ceil(x1 / factor)] = inside
        masks.append(m)
    return masks


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` views -> float ``(N, 3, H, W)`` in [-1, 1] (what a FLUX VAE encodes)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def encode_views(
    images: Sequence[np.ndarray], encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 4
) -> list[torch.Tensor]:
    """Encode every view once (``encode``: ``(B, 3, H, W)`` in [-1, 1] -> latents ``(B, C, h, w)``)."""
    latents: list[torch.Tensor] = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            out = encode(to_tensor(images[i : i + batch_size]))
            latents.extend(t.detach().float().cpu() for t in out)
    return latents


def view_cache_key(image_bytes: bytes, settings: dict[str, object], encoder_id: str) -> str:
    """A name for the encoded views of this photo, these view settings and this encoder."""
    digest = hashlib.sha256(image_bytes)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(encoder_id.encode())
    return digest.hexdigest()[:24]


def cached_latents(
    cache_dir: str | os.PathLike | None, key: str, compute: Callable[[], list[torch.Tensor]]
) -> list[torch.Tensor]:
    """``compute()`` once per key: with a ``cache_dir`` the latents are kept as ``<key>.safetensors``."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        tensors, _ = load_tensors(path)
        return list(tensors["latents"].unbind(0))
    latents = compute()
    save_tensors(path, {"latents": torch.stack(latents)}, {"format": "metalora.view_latents"})
    return latents


def augment_settings(aug: AugmentConfig, n: int, resolution: int, face_box: Box | None, seed: int) -> dict:
    return {"augment": asdict(aug), "views": n, "resolution": resolution, "face_box": face_box, "seed": seed}
