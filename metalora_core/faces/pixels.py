"""Pixel-space diagnostics: PSNR, SSIM and pixel diversity, in numpy (+ OpenCV, which insightface needs).

PSNR / SSIM against the personalization photo measure how much a generated image COPIES that photo (pose,
background, framing): high values are a warning sign for a method meant to re-imagine a person, not a
quality score. SSIM follows Wang et al. 2004 with a Gaussian window (sigma 1.5, 11 taps), K1 = 0.01,
K2 = 0.03, on luminance (ITU-R BT.601), population statistics, the border of half a window left out, as
``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
"""

from __future__ import annotations

import itertools

import numpy as np

from .images import resize_rgb, to_rgb_uint8


def _pair(generated, reference) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64 RGB at the reference's size (the generated image is resized to it)."""
    gen, ref = to_rgb_uint8(generated), to_rgb_uint8(reference)
    if gen.shape != ref.shape:
        gen = resize_rgb(gen, (ref.shape[1], ref.shape[0]))
    return gen.astype(np.float64), ref.astype(np.float64)


def psnr(generated, reference) -> float:
    """Peak signal-to-noise ratio in dB over RGB, data range 255; inf for identical images."""
    gen, ref = _pair(generated, reference)
    mse = float(np.mean((gen - ref) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def ssim_gray(x: np.ndarray, y: np.ndarray, data_range: float = 255.0, sigma: float = 1.5) -> float:
    """Mean SSIM of two float greyscale images of equal shape."""
    import cv2

    taps = 2 * int(3.5 * sigma + 0.5) + 1
    pad = (taps - 1) // 2
    if min(x.shape) < taps:
        raise ValueError(f"images must be at least {taps} px on each side for SSIM, got {x.shape}")

    def blur(a):
        return cv2.GaussianBlur(a, (taps, taps), sigma, borderType=cv2.BORDER_REFLECT)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s[pad:-pad, pad:-pad].mean())


def ssim(generated, reference) -> float:
    """SSIM on luminance of the generated image (resized to the reference) against the reference."""
    gen, ref = _pair(generated, reference)
    return ssim_gray(luminance(gen), luminance(ref))


def pixel_diversity(images, size: int = 64) -> float | None:
    """Mean over pairs of the mean absolute RGB difference (in [0, 1]) of the images shrunk to size x size;
    None for fewer than two images. Near 0 means the batch repeats one picture."""
    small = [resize_rgb(to_rgb_uint8(im), (size, size)).astype(np.float64) / 255.0 for im in images]
    if len(small) < 2:
        return None
    return float(np.mean([np.abs(a - b).mean() for a, b in itertools.combinations(small, 2)]))
