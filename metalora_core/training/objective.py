"""The rectified-flow objective FLUX is trained with, shared by personalization and meta-training.

``x_t = (1 - t) x0 + t noise`` and the model predicts the velocity ``noise - x0``. Timesteps are drawn
logit-normal (SD3 / FLUX training distribution: most weight on mid noise levels) and then moved by FLUX's
resolution-dependent shift, the same ``mu`` the FLUX sampler uses at inference for that many image tokens,
so training spends its steps on the noise levels the sampler will actually visit at that resolution.
"""

from __future__ import annotations

import math

import torch

from .protocol import FluxBackend, TextConditioning

BASE_SHIFT, MAX_SHIFT = 0.5, 1.15
BASE_SEQ, MAX_SEQ = 256, 4096


def flux_mu(image_tokens: int) -> float:
    """FLUX's shift parameter for an image of ``image_tokens`` packed 2x2 latent tokens (linear in length)."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ - BASE_SEQ)
    return BASE_SHIFT + slope * (image_tokens - BASE_SEQ)


def shift_timesteps(t: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX's ``time_shift(mu, 1, t)``: pushes ``t`` towards 1 (more noise) for larger images."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def sample_timesteps(
    batch: int,
    latent_hw: tuple[int, int],
    generator: torch.Generator | None = None,
    shift: bool = True,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Logit-normal ``t`` in (0, 1), FLUX-shifted for the latent size ``(H, W)`` unless ``shift`` is off."""
    u = torch.randn(batch, generator=generator, device="cpu")
    t = torch.sigmoid(u).clamp(1e-4, 1 - 1e-4)
    if shift:
        h, w = latent_hw
        t = shift_timesteps(t, flux_mu((h // 2) * (w // 2)))
    return t.to(device)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1.0 - t) * x0 + t * noise


def flow_loss(
    backend: FluxBackend,
    x0: torch.Tensor,
    cond: TextConditioning,
    t: torch.Tensor,
    noise: torch.Tensor,
    guidance: float | None = 1.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared velocity error; ``weight`` (broadcastable to the latents, e.g. a face mask) reweights it."""
    x_t = noisy_latents(x0, noise, t)
    pred = backend.velocity(x_t, t, cond, guidance)
    work = torch.promote_types(pred.dtype, torch.float32)  # float32 or better (float64 in gradient checks)
    err = (pred.to(work) - (noise - x0).to(work)) ** 2
    if weight is None:
        return err.mean()
    w = weight.to(err.dtype).expand_as(err)
    return (err * w).sum() / w.sum().clamp_min(1e-8)


__all__ = ["flow_loss", "flux_mu", "noisy_latents", "sample_timesteps", "shift_timesteps"]
