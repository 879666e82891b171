"""Face-aware crops and soft face masks, for training views and for display.

Boxes are (x0, y0, x1, y1) in pixels, x1/y1 exclusive. A crop grows the face box by ``margin`` (a fraction of
the box size on every side), takes the requested aspect around the face centre, and slides the window back
inside the image instead of padding (padding would teach the model black borders); only if the window is
larger than the image does it shrink, keeping its aspect. The soft mask is 1 on an ellipse inscribed in the
face box and falls off smoothly outside it, so it can weight a training loss towards the face without a
hard edge the model could learn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import MetaLoRAError
from .images import resize_rgb, to_rgb_uint8

Box = tuple[int, int, int, int]


def _check_box(box, what: str = "face box") -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise MetaLoRAError(
            f"{what} {tuple(box)} is empty: expected (x0, y0, x1, y1) with x1 > x0 and y1 > y0"
        )
    return x0, y0, x1, y1


def expand_box(box, margin: float, image_hw: tuple[int, int], aspect: float | None = 1.0) -> Box:
    """The face box grown by ``margin`` per side, at width/height ``aspect`` (None: keep the grown box's),
    shifted inside the image and shrunk (aspect kept) only if larger than the image."""
    x0, y0, x1, y1 = _check_box(box)
    h_img, w_img = int(image_hw[0]), int(image_hw[1])
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w = (x1 - x0) * (1 + 2 * margin)
    h = (y1 - y0) * (1 + 2 * margin)
    if aspect is not None:
        if aspect <= 0:
            raise MetaLoRAError(f"crop aspect must be > 0, got {aspect}")
        # smallest window of that aspect holding the grown box
        if w / h < aspect:
            w = h * aspect
        else:
            h = w / aspect
    fit = min(1.0, w_img / w, h_img / h)
    w, h = w * fit, h * fit
    w, h = max(1, min(w_img, int(round(w)))), max(1, min(h_img, int(round(h))))
    left = int(round(cx - w / 2))
    top = int(round(cy - h / 2))
    left = min(max(left, 0), w_img - w)
    top = min(max(top, 0), h_img - h)
    return left, top, left + w, top + h


@dataclass
class FaceCrop:
    """A crop and how it maps back: ``image`` uint8 RGB, ``box`` in the source image, ``face_box`` and
    ``mask`` (float32 (H, W) in [0, 1]) in the crop's pixels."""

    image: np.ndarray
    box: Box
    face_box: tuple[float, float, float, float]
    mask: np.ndarray
    scale: tuple[float, float]  # crop pixels per source pixel (x, y)


def face_crop(
    image,
    face_box,
    margin: float = 0.5,
    aspect: float | str | None = "square",
    size: int | tuple[int, int] | None = None,
    feather: float = 0.3,
) -> FaceCrop:
    """Crop around a face: ``aspect`` 'square', 'image' (the source's aspect), a number (width/height) or None
    (the grown box's own); ``size`` an int (longest side) or (width, height); plus the soft mask in the crop."""
    rgb = to_rgb_uint8(image)
    hw = rgb.shape[:2]
    if aspect == "square":
        aspect = 1.0
    elif aspect == "image":
        aspect = hw[1] / hw[0]
    elif isinstance(aspect, str):
        raise MetaLoRAError(f"crop aspect must be 'square', 'image', a number or None, got {aspect!r}")
    x0, y0, x1, y1 = expand_box(face_box, margin, hw, aspect)
    crop = rgb[y0:y1, x0:x1]
    fx0, fy0, fx1, fy1 = _check_box(face_box)
    face_in_crop = [fx0 - x0, fy0 - y0, fx1 - x0, fy1 - y0]
    sx = sy = 1.0
    if size is not None:
        if isinstance(size, int):
            longest = max(crop.shape[0], crop.shape[1])
            out_w = max(1, round(crop.shape[1] * size / longest))
            out_h = max(1, round(crop.shape[0] * size / longest))
        else:
            out_w, out_h = int(size[0]), int(size[1])
        sx, sy = out_w / crop.shape[1], out_h / crop.shape[0]
        crop = resize_rgb(crop, (out_w, out_h))
        face_in_crop = [
            face_in_crop[0] * sx,
            face_in_crop[1] * sy,
            face_in_crop[2] * sx,
            face_in_crop[3] * sy,
        ]
    mask = soft_face_mask(crop.shape[:2], face_in_crop, feather)
    return FaceCrop(np.ascontiguousarray(crop), (x0, y0, x1, y1), tuple(face_in_crop), mask, (sx, sy))


def soft_face_mask(image_hw: tuple[int, int], face_box, feather: float = 0.3) -> np.ndarray:
    """float32 (H, W) in [0, 1]: 1 inside the ellipse inscribed in the face box, then a smooth (cosine)
    fall-off to 0 over ``feather`` times the box half-size outside it. ``feather=0`` gives a hard ellipse."""
    x0, y0, x1, y1 = _check_box(face_box)
    h, w = int(image_hw[0]), int(image_hw[1])
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5  # pixel centres
    r = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)  # 1 on the ellipse
    if feather <= 0:
        return (r <= 1).astype(np.float32)
    t = np.clip((r - 1) / feather, 0, 1)
    return (0.5 * (1 + np.cos(np.pi * t))).astype(np.float32)


def loss_weights(mask: np.ndarray, face_weight: float = 2.0, background: float = 1.0) -> np.ndarray:
    """Per-pixel loss weights ``background + (face_weight - background) * mask``, normalised to mean 1 so the
    loss scale (and so the learning rate) does not change with the face size."""
    weights = background + (face_weight - background) * np.asarray(mask, np.float64)
    mean = weights.mean()
    return (weights / mean if mean > 0 else weights).astype(np.float32)


def downsample_mask(mask: np.ndarray, factor: int = 8) -> np.ndarray:
    """Average-pool a mask by ``factor`` (8 = FLUX's VAE), e.g. to weight a latent-space loss."""
    mask = np.asarray(mask, np.float32)
    h, w = mask.shape[0] // factor, mask.shape[1] // factor
    if h == 0 or w == 0:
        raise MetaLoRAError(f"mask {mask.shape} is smaller than the downsampling factor {factor}")
    return mask[: h * factor, : w * factor].reshape(h, factor, w, factor).mean(axis=(1, 3))


def face_box(image, analyzer, index: int = 0, margin: float = 0.0) -> Box | None:
    """The trainer's hook: the face box (x0, y0, x1, y1) in pixels of ``image`` (grown by ``margin``, kept
    inside the image, aspect free), or None when no face is found."""
    rgb = to_rgb_uint8(image)
    face = analyzer.face(rgb, index)
    if face is None:
        return None
    if margin == 0:
        x0, y0, x1, y1 = face.box
        h, w = rgb.shape[:2]
        return max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    return expand_box(face.bbox, margin, rgb.shape[:2], aspect=None)


NO_FACE_MODES = ("whole image", "skip", "error")


def whole_image_crop(image, size: int) -> FaceCrop:
    """The largest centred square of ``image`` resized to ``size`` with an all-zero mask: the stand-in for a
    photo without a face, so a batch keeps its length and the mask says "no face here"."""
    rgb = to_rgb_uint8(image)
    h, w = rgb.shape[:2]
    side = min(h, w)
    left, top = (w - side) // 2, (h - side) // 2
    crop = resize_rgb(rgb[top : top + side, left : left + side], (size, size))
    mask = np.zeros((size, size), np.float32)
    return FaceCrop(
        np.ascontiguousarray(crop),
        (left, top, left + side, top + side),
        (0.0, 0.0, 0.0, 0.0),
        mask,
        (size / side, size / side),
    )


@dataclass
class BatchCrops:
    """Face Crop over a batch: the crops (never empty), the source index of each, the faceless indices and
    a one-paragraph report saying what happened to them."""

    crops: list[FaceCrop]
    sources: list[int]
    faceless: list[int]
    report: str


def crop_batch(
    images: Sequence,
    find_face: Callable[[np.ndarray], tuple | None],
    margin: float,
    size: int,
    if_no_face: str = "whole image",
    what: str = "face",
) -> BatchCrops:
    """Square face crops of every image; ``find_face(rgb)`` gives a face box or None. A faceless image is
    replaced by :func:`whole_image_crop` ('whole image'), left out ('skip') or raises naming its index
    ('error'; ``what`` names the face sought in that message). A batch cannot be empty, so when 'skip' leaves nothing the whole images come back instead
    (zero masks) and the report says so."""
    if if_no_face not in NO_FACE_MODES:
        raise MetaLoRAError(f"if_no_face must be one of {NO_FACE_MODES}, got {if_no_face!r}")
    rgbs = [to_rgb_uint8(image) for image in images]
    crops: list[FaceCrop] = []
    sources: list[int] = []
    faceless: list[int] = []
    for i, rgb in enumerate(rgbs):
        box = find_face(rgb)
        if box is None:
            if if_no_face == "error":
                raise MetaLoRAError(
                    f"image {i} of the batch has no detectable {what}; use a photo where the face is visible "
                    "and at least ~64 pixels wide, or set if_no_face to 'whole image' or 'skip'"
                )
            faceless.append(i)
            if if_no_face == "skip":
                continue
            crops.append(whole_image_crop(rgb, size))
        else:
            crops.append(face_crop(rgb, box, margin=margin, aspect="square", size=(size, size)))
        sources.append(i)
    total = len(rgbs)
    lines = [f"{total - len(faceless)} of {total} images had a face."]
    if faceless:
        what = "skipped" if if_no_face == "skip" else "whole image, zero mask"
        lines.append(f"No face in image(s) {', '.join(map(str, faceless))} ({what}).")
    if not crops:
        crops = [whole_image_crop(rgb, size) for rgb in rgbs]
        sources = list(range(total))
        lines.append(
            "No image had a face: returning the whole images with zero masks (a batch cannot be empty)."
        )
    return BatchCrops(crops, sources, faceless, " ".join(lines))
