"""The standalone training backend: diffusers' ``FluxTransformer2DModel``.

It speaks FLUX's conventions so the loop does not have to: VAE latents ``(B, C, H, W)`` are packed into
2x2 patches (``(B, H/2 * W/2, 4C)``, diffusers' pipeline layout), image RoPE ids are ``(0, row, col)`` and
text ids zero, ``t`` in [0, 1] is passed as is (the model multiplies by 1000 itself, as its pipeline
expects), and the guidance value goes to the guidance embedder when the model has one (FLUX.1-dev).

diffusers' FLUX blocks are out-of-place (``hidden_states = hidden_states + ...``), so autograd through them,
checkpointed or not, is correct; the float64 finite-difference test in tests/training guards this.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from ..adapter import IdentityHead
from ..inject import attach_to_diffusers, detach_heads
from ..targets import FluxDims
from .protocol import TextConditioning


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4C)``: FLUX's 2x2 patch tokens, row-major over the patch grid."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for latents of ``height x width``."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """RoPE positions ``(0, row, col)`` of the packed tokens of ``height x width`` latents."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(height // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


class DiffusersFluxBackend:
    """:class:`~metalora_core.training.protocol.FluxBackend` on a diffusers FLUX transformer (frozen)."""

    def __init__(self, model: torch.nn.Module, dims: FluxDims) -> None:
        self.model = model.requires_grad_(False).eval()
        self.dims = dims
        first = next(model.parameters())
        self.device = first.device
        self.dtype = first.dtype
        self.has_guidance = bool(getattr(model.config, "guidance_embeds", dims.guidance))

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> DiffusersFluxBackend:
        """Load a diffusers folder (pipeline or transformer) or a BFL / diffusers single file, offline."""
        from ..flux_model import load_diffusers_flux

        model, dims = load_diffusers_flux(path, dtype=dtype, device=device)
        return cls(model, dims)

    def velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning, guidance: float | None
    ) -> torch.Tensor:
        b, _, h, w = x_t.shape
        if h % 2 or w % 2:
            raise ValueError(f"latents must have even height and width for FLUX's 2x2 packing, got {h}x{w}")
        weight_dtype = self.dtype
        context, pooled = cond.batch(b, self.device, weight_dtype)
        if pooled is None and self.dims.vec_dim:
            pooled = torch.zeros(b, self.dims.vec_dim, device=self.device, dtype=weight_dtype)
        kwargs = {
            "hidden_states": pack_latents(x_t.to(self.device, weight_dtype)),
            "encoder_hidden_states": context,
            "pooled_projections": pooled,
            "timestep": t.to(self.device, weight_dtype).reshape(b),
            "img_ids": image_ids(h, w, self.device, weight_dtype),
            "txt_ids": torch.zeros(context.shape[1], 3, device=self.device, dtype=weight_dtype),
            "return_dict": False,
        }
        if self.has_guidance:
            kwargs["guidance"] = torch.full(
                (b,), 1.0 if guidance is None else float(guidance), device=self.device, dtype=weight_dtype
            )
        out = self.model(**kwargs)[0]
        return unpack_latents(out, h, w)

    @contextmanager
    def adapters(self, heads: Mapping[str, IdentityHead]) -> Iterator[None]:
        attach_to_diffusers(self.model, self.dims, heads)
        try:
            yield
        finally:
            detach_heads(self.model)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.model.enable_gradient_checkpointing(gradient_checkpointing_func=_non_reentrant_checkpoint)
        else:
            self.model.disable_gradient_checkpointing()


def _non_reentrant_checkpoint(module, *args):
    """Block checkpointing that recomputes in backward without the reentrant autograd engine."""
    return checkpoint(partial(module.__call__), *args, use_reentrant=False)
