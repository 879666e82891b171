"""The rectified-flow objective FLUX.1 and Qwen-Image are trained with, shared by personalization and
meta-training.

``x_t = (1 - t) x0 + t noise`` and the model predicts the velocity ``noise - x0``. Timesteps are drawn
logit-normal (SD3 / FLUX training distribution: most weight on mid noise levels) and then moved by the
family's resolution-dependent shift, the same ``mu`` its sampler uses at inference for that many image
tokens (``shift_range`` of the family), so training spends its steps on the noise levels the sampler will
actually visit at that resolution.
"""

from __future__ import annotations

import torch

from ..models.family import exponential_shift, linear_mu
from ..models.flux import SHIFT_RANGE as FLUX_SHIFT_RANGE
from ..models.flux import flux_mu
from .protocol import FluxBackend, TextConditioning

ShiftRange = tuple[int, int, float, float]


def shift_timesteps(t: torch.Tensor, mu: float) -> torch.Tensor:
    """``time_shift(mu, 1, t)``: pushes ``t`` towards 1 (more noise) for larger images."""
    return exponential_shift(t, mu)


def sample_timesteps(
    batch: int,
    latent_hw: tuple[int, int],
    generator: torch.Generator | None = None,
    shift: bool = True,
    device: torch.device | str = "cpu",
    shift_range: ShiftRange = FLUX_SHIFT_RANGE,
) -> torch.Tensor:
    """Logit-normal ``t`` in (0, 1), shifted for the latent size ``(H, W)`` with the family's ``mu`` range
    (FLUX's by default) unless ``shift`` is off."""
    u = torch.randn(batch, generator=generator, device="cpu")
    t = torch.sigmoid(u).clamp(1e-4, 1 - 1e-4)
    if shift:
        h, w = latent_hw
        t = shift_timesteps(t, linear_mu((h // 2) * (w // 2), shift_range))
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
