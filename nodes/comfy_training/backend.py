"""``ComfyFluxBackend``: the in-graph trainer on the FLUX.1 model ComfyUI already loaded (a ``ModelPatcher``).

The family-blind part (loading, heads on a clone, checkpointing) is :class:`.base.ComfyBackend`; this module
is FLUX.1's: how a ComfyUI ``Flux`` is recognised and sized, its block replacements (:mod:`.patches`) and
its velocity call:

- ``Flux`` is fed unpacked latents ``(B, 16, H, W)``, the timestep as the flow time ``t = sigma`` in [0, 1]
  (ComfyUI's ``ModelSamplingFlux.timestep`` is the identity; the model scales by 1000 inside its embedding,
  as BFL and diffusers do), the distilled guidance as a plain number (3.5, not multiplied; ``None`` = 1.0
  like the standalone backend), context and pooled vector in the compute dtype. ComfyUI's
  ``calculate_denoised(x_t) = x_t - sigma * out`` confirms ``out = noise - x0``, the protocol's velocity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import comfy.ldm.flux.model
import comfy.model_base
import torch
from torch import nn

from ...metalora_core.adapter import IdentityHead
from ...metalora_core.errors import MetaLoRAError
from ...metalora_core.targets import FluxDims
from ...metalora_core.training.protocol import TextConditioning
from .base import ComfyBackend, unsupported_model
from .patches import BlockReplacement, replacements


def flux_dims(diffusion_model: nn.Module) -> FluxDims:
    """FLUX sizes of a loaded ComfyUI ``Flux`` (its params are read from the checkpoint's tensors)."""
    p = diffusion_model.params
    return FluxDims(
        hidden=p.hidden_size,
        mlp_hidden=int(p.hidden_size * p.mlp_ratio),
        depth=p.depth,
        depth_single=p.depth_single_blocks,
        in_channels=p.in_channels,
        context_dim=p.context_in_dim,
        vec_dim=p.vec_in_dim or 0,
        guidance=bool(p.guidance_embed),
        out_channels=p.out_channels,
        head_dim=p.hidden_size // p.num_heads,
    )


def check_flux1(model_patcher) -> nn.Module:
    """The ``Flux`` diffusion model of a FLUX.1 patcher, or a clear error for any other model."""
    base = getattr(model_patcher, "model", None)
    dm = getattr(base, "diffusion_model", None)
    name = type(base).__name__
    if not isinstance(base, comfy.model_base.Flux) or not isinstance(dm, comfy.ldm.flux.model.Flux):
        raise unsupported_model(model_patcher)
    p = dm.params
    if isinstance(base, comfy.model_base.Flux2) or p.global_modulation or p.yak_mlp or p.mlp_silu_act:
        raise MetaLoRAError(
            f"MODEL input: '{name}' is a FLUX variant with a different block layout; Meta-LoRA supports FLUX.1"
        )
    if p.patch_size != 2 or p.in_channels != 16:
        raise MetaLoRAError(f"MODEL input: FLUX with {p.in_channels} latent channels is not FLUX.1 (16)")
    return dm


class ComfyFluxBackend(ComfyBackend):
    """The protocol's ``velocity`` / ``adapters`` / ``set_gradient_checkpointing`` on a ComfyUI FLUX.1."""

    label = "FLUX.1"
    diffusion_model_of = staticmethod(check_flux1)
    dims_of = staticmethod(flux_dims)

    def block_replacements(
        self, heads: Mapping[str, IdentityHead], checkpointing: Callable[[], bool]
    ) -> dict[tuple[str, int], BlockReplacement]:
        return replacements(self.diffusion_model, heads, checkpointing)

    def velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning, guidance: float | None
    ) -> torch.Tensor:
        b = x_t.shape[0]
        context, pooled = cond.batch(b, self.device, self.dtype)
        g = None
        if self.dims.guidance:  # None means 1.0 (unguided), as in the standalone DiffusersBackend
            g = torch.full(
                (b,), 1.0 if guidance is None else float(guidance), device=self.device, dtype=self.dtype
            )
        t, options = self.forward_options(t, b)
        return self.diffusion_model(
            x_t.to(self.device, self.dtype),
            t,
            context=context,
            y=pooled,
            guidance=g,
            transformer_options=options,
        )
