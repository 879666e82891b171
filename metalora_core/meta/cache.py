"""Encode every photo once: VAE latents at its bucket and text features per caption, kept on disk.

Cache files are safetensors named by a hash of the content and every setting that shapes them (photo
bytes, bucket, face box, encoder), written atomically; a rerun, a resumed run or another rank reuses them
instead of re-encoding. The latent cache is the personalization trainer's (:func:`cached_latents`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..buckets import resize_center_crop
from ..training.conditioning import encode_prompt, load_conditioning, save_conditioning
from ..training.data import cached_latents, crop_window, encode_views, view_cache_key
from ..training.protocol import TextConditioning
from .dataset import Box, ImageItem


def item_pixels(item: ImageItem, size: tuple[int, int], face: Box | None = None) -> np.ndarray:
    """The photo at ``size`` (w, h): centre-cropped to the bucket's aspect, or centred on the face if known."""
    from ..faces import load_image

    photo = Image.fromarray(load_image(item.path))
    if face is None:
        return np.asarray(resize_center_crop(photo, size))
    window = crop_window(photo.width, photo.height, size[0] / size[1], 1.0, face, None)
    return np.asarray(photo.resize(size, Image.Resampling.LANCZOS, box=window))


def item_latent(
    item: ImageItem,
    size: tuple[int, int],
    face: Box | None,
    encoder_id: str,
    encode: Callable[[torch.Tensor], torch.Tensor],
    cache_dir: str | os.PathLike | None,
) -> torch.Tensor:
    """The VAE latent ``(C, h, w)`` of one photo at ``size``, from the cache when it is there."""
    key = view_cache_key(
        item.path.read_bytes(), {"meta_bucket": list(size), "face": face, "crop": "centre"}, encoder_id
    )
    return cached_latents(cache_dir, key, lambda: encode_views([item_pixels(item, size, face)], encode))[0]


def cached_conditioning(
    caption: str,
    encoders: str | os.PathLike,
    cache_dir: str | os.PathLike | None,
    device: str | torch.device = "cpu",
) -> TextConditioning:
    """FLUX text features of ``caption`` (from the pipeline's text encoders), encoded once per caption."""
    if cache_dir is None:
        return encode_prompt(encoders, caption, device)
    digest = hashlib.sha256(f"{Path(encoders).resolve()}\n{caption}".encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"text-{digest}.safetensors"
    if path.is_file():
        return load_conditioning(path)
    cond = encode_prompt(encoders, caption, device)
    save_conditioning(path, cond, {"caption": caption})
    return cond
