"""A plain FLUX sampler over the training backend: Euler steps of the rectified flow, FLUX's schedule.

Why here: the demo and the tests need images from a personalized model without ComfyUI. It uses the
same :class:`~metalora_core.training.protocol.FluxBackend` the trainer uses, so an identity is applied
exactly as it was trained (bypass heads), and FLUX's own timestep shift for the image size (the ``mu``
that training's timestep sampling also uses). It is deliberately minimal: no CFG (FLUX.1-dev is
guidance-distilled: the guidance value goes to its embedder), no scheduler zoo.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .training.objective import flux_mu, shift_timesteps
from .training.protocol import FluxBackend, TextConditioning


def flux_schedule(steps: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """``steps + 1`` times from 1 (noise) to 0 (image), shifted by FLUX's ``mu`` for this latent size."""
    h, w = latent_hw
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    inner = shift_timesteps(t[1:-1], flux_mu((h // 2) * (w // 2)))
    return torch.cat([t[:1], inner, t[-1:]]).float()


@torch.no_grad()
def sample_latents(
    backend: FluxBackend,
    cond: TextConditioning,
    latent_hw: tuple[int, int],
    steps: int = 20,
    guidance: float = 3.5,
    seed: int = 0,
    channels: int = 16,
) -> torch.Tensor:
    """One image's latents ``(1, C, H, W)``: Euler from seeded noise along ``x_t = (1 - t) x0 + t noise``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, *latent_hw, generator=g)
    times = flux_schedule(steps, latent_hw)
    for t, t_next in zip(times[:-1], times[1:]):
        v = backend.velocity(x, t.reshape(1), cond, guidance).float().cpu()
        x = x + (t_next - t) * v
    return x


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> np.ndarray:
    """FLUX latents -> uint8 RGB ``(H, W, 3)`` through a diffusers VAE (undoing its scale and shift)."""
    scale = float(vae.config.scaling_factor)
    shift = float(vae.config.shift_factor or 0.0)
    param = next(vae.parameters())
    image = vae.decode(latents.to(param.device, param.dtype) / scale + shift).sample[0]
    image = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return image.permute(1, 2, 0).cpu().numpy()


def generate(
    backend: FluxBackend,
    vae,
    cond: TextConditioning,
    size: tuple[int, int],
    seeds: list[int],
    steps: int = 20,
    guidance: float = 3.5,
    on_image: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Images of ``size`` (w, h; multiples of 16) for each seed."""
    w, h = size
    images = []
    for i, seed in enumerate(seeds):
        latents = sample_latents(backend, cond, (h // 8, w // 8), steps, guidance, seed)
        images.append(decode(vae, latents))
        if on_image is not None:
            on_image(i)
    return images
