"""Bring any image the project meets to one form: uint8 RGB (H, W, 3) numpy; plus content hashes and files.

Accepted: uint8 or float arrays / torch tensors (floats in [0, 1], as ComfyUI's IMAGE), (H, W), (H, W, 1),
(H, W, 3), (H, W, 4) and batches (B, H, W, C). Greyscale is repeated to RGB; RGBA is composited over white
(transparent pixels carry no face; white is what a viewer shows).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..errors import MetaLoRAError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _to_numpy(image) -> np.ndarray:
    if hasattr(image, "detach"):  # torch tensor, without importing torch here
        tensor = image.detach().cpu()
        image = (tensor.float() if tensor.is_floating_point() else tensor).numpy()
    elif not isinstance(image, np.ndarray):
        image = np.asarray(image)
    return image


def to_rgb_uint8(image, what: str = "image") -> np.ndarray:
    """One image as contiguous uint8 RGB (H, W, 3)."""
    arr = _to_numpy(image)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise MetaLoRAError(f"{what}: expected an image (H, W), (H, W, 1|3|4), got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_:
            raise MetaLoRAError(f"{what}: unsupported dtype {arr.dtype}")
        is_float = np.issubdtype(arr.dtype, np.floating)
        arr = arr.astype(np.float64)
        if is_float:
            arr = arr * 255.0  # floats are [0, 1] (ComfyUI IMAGE)
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        alpha = arr[:, :, 3:4].astype(np.float64) / 255.0
        arr = np.rint(arr[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(arr)


def as_image_list(images, what: str = "images") -> list[np.ndarray]:
    """A batch (B, H, W, C) array/tensor, a single image, or a sequence of images -> list of uint8 RGB."""
    if isinstance(images, (list, tuple)):
        return [to_rgb_uint8(im, f"{what}[{i}]") for i, im in enumerate(images)]
    arr = _to_numpy(images)
    if arr.ndim == 4:
        return [to_rgb_uint8(arr[i], f"{what}[{i}]") for i in range(arr.shape[0])]
    return [to_rgb_uint8(arr, what)]


def content_hash(image: np.ndarray) -> str:
    """SHA-1 over shape and pixels of the normalised image: equal pictures share cache entries."""
    digest = hashlib.sha1(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file (EXIF rotation applied) as uint8 RGB, with an error naming the file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                return to_rgb_uint8(np.asarray(im.convert("RGBA")), str(path))
            return to_rgb_uint8(np.asarray(im.convert("RGB")), str(path))
    except FileNotFoundError:
        raise MetaLoRAError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MetaLoRAError(f"{path}: not a readable image ({exc})") from None


EXIF_ORIENTATION = 0x0112
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees: width and height swap


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` as :func:`load_image` will return the picture (EXIF rotation applied), header only."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
            rotated = im.getexif().get(EXIF_ORIENTATION) in _TRANSPOSED
    except FileNotFoundError:
        raise MetaLoRAError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MetaLoRAError(f"{path}: not a readable image ({exc})") from None
    return (height, width) if rotated else (width, height)


def list_images(folder: str | os.PathLike, what: str = "folder") -> list[Path]:
    """Image files of a folder (sorted, not recursive); an empty or missing folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MetaLoRAError(f"{what} {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MetaLoRAError(f"{what} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_images(paths: Iterable[str | os.PathLike]) -> list[np.ndarray]:
    return [load_image(p) for p in paths]


def resize_rgb(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize uint8 RGB to (width, height) with a good filter (area when shrinking, cubic when growing)."""
    import cv2

    w, h = int(size[0]), int(size[1])
    shrink = w * h < image.shape[0] * image.shape[1]
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
