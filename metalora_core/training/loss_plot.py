"""A loss-curve PNG drawn with PIL (no plotting library): raw losses faint, a moving average bold."""

from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image, ImageDraw

from ..safeio import atomic_write_bytes


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard smooths)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def draw_loss_curve(losses: list[float], title: str = "training loss", size=(800, 400)) -> Image.Image:
    width, height = size
    left, right, top, bottom = 70, 20, 40, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 12), title, fill="black")
    finite = [v for v in losses if math.isfinite(v)]
    if not finite:
        draw.text((left, height // 2), "no finite loss values", fill="black")
        return image
    lo, hi = min(finite), max(finite)
    hi = hi if hi > lo else lo + 1.0
    n = max(1, len(losses) - 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        return (
            left + (width - left - right) * i / n,
            top + (height - top - bottom) * (1 - (v - lo) / (hi - lo)),
        )

    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    for frac in (0.0, 0.5, 1.0):
        value = lo + frac * (hi - lo)
        y = xy(0, value)[1]
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((4, y - 6), f"{value:.4g}", fill="black")
    draw.text((left, height - bottom + 8), "step 1", fill="black")
    draw.text((width - right - 60, height - bottom + 8), f"step {len(losses)}", fill="black")
    raw = [xy(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
    avg = [xy(i, v) for i, v in enumerate(smooth(finite))]
    if len(raw) > 1:
        draw.line(raw, fill=(170, 190, 230), width=1)
        draw.line(avg, fill=(20, 60, 160), width=3)
    else:
        draw.ellipse((raw[0][0] - 3, raw[0][1] - 3, raw[0][0] + 3, raw[0][1] + 3), fill=(20, 60, 160))
    return image


def save_loss_curve(path: str | os.PathLike, losses: list[float], title: str = "training loss") -> Path:
    image = draw_loss_curve(losses, title)
    return atomic_write_bytes(path, lambda tmp: image.save(tmp, format="PNG"))
