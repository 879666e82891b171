"""The small surface a training loop needs from a FLUX implementation.

Two backends implement it: diffusers' ``FluxTransformer2DModel`` (standalone, ``metalora_core``) and the
model ComfyUI already loaded (``nodes/``). The loop never sees more than this, so both paths share every
line of training logic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..adapter import IdentityHead
from ..targets import FluxDims


@dataclass
class TextConditioning:
    """A prompt already encoded: T5 token features and the CLIP pooled vector (FLUX's two text inputs)."""

    context: torch.Tensor  # (tokens, context_dim)
    pooled: torch.Tensor | None = None  # (vec_dim,)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> TextConditioning:
        """The same features on ``device`` in ``dtype`` (moved once, before a loop, not once per step)."""
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        return TextConditioning(self.context.to(device, dtype), pooled)

    def batch(
        self, n: int, device: torch.device | str, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ctx = self.context.to(device, dtype).unsqueeze(0).expand(n, -1, -1)
        pooled = None if self.pooled is None else self.pooled.to(device, dtype).unsqueeze(0).expand(n, -1)
        return ctx, pooled


@runtime_checkable
class FluxBackend(Protocol):
    """What the training loops call. Latents are VAE latents ``(B, C, H, W)``, unpacked."""

    dims: FluxDims
    device: torch.device
    dtype: torch.dtype  # compute dtype of the forward (autocast / weights)

    def velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning, guidance: float | None
    ) -> torch.Tensor:
        """Predicted flow-matching velocity (``noise - x0``) for noisy latents at times ``t`` in [0, 1]."""
        ...

    def adapters(self, heads: Mapping[str, IdentityHead]) -> AbstractContextManager[None]:
        """Route the heads (keyed by canonical target name) into the forward while the context is open.

        On exit, however it is left, the model is exactly as before.
        """
        ...

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute block activations in backward (non-reentrant), trading compute for memory."""
        ...


ProgressFn = Callable[["Progress"], None]


@dataclass
class Progress:
    step: int
    total: int
    loss: float
    lr: float
    eta_s: float


class TrainingCancelled(Exception):
    """Raised by a loop when its cancel callback says stop; nothing is written after it."""
