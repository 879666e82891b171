"""The standalone training backend: the family's diffusers transformer (``FluxTransformer2DModel``,
``QwenImageTransformer2DModel``).

The family speaks its model's conventions so the loop does not have to (``model_inputs`` in
:mod:`metalora_core.models`): for FLUX, VAE latents ``(B, C, H, W)`` are packed into 2x2 patches
(``(B, H/2 * W/2, 4C)``, diffusers' pipeline layout), image RoPE ids are ``(0, row, col)`` and text ids
zero, ``t`` in [0, 1] is passed as is (the model multiplies by 1000 itself, as its pipeline expects), and
the guidance value goes to the guidance embedder when the model has one (FLUX.1-dev). Qwen-Image packs the
same way and passes image shapes instead of ids.

diffusers' FLUX and Qwen-Image blocks are out-of-place (``hidden_states = hidden_states + ...``), so autograd through them,
checkpointed or not, is correct; the float64 finite-difference test in tests/training guards this.

A forward with gradients enabled is a training forward: it runs under :func:`.attention.training_sdpa` (no
cuDNN attention), and so does every block a checkpoint recomputes in backward. A forward without
gradients (sampling) keeps PyTorch's own attention choice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from ..adapter import IdentityHead
from ..inject import attach_to_diffusers, detach_heads
from ..models import family_of
from ..models.flux import image_ids, pack_latents, unpack_latents  # noqa: F401  (FLUX's, importable here)
from .attention import training_sdpa
from .precision import hooked_modules, store_layerwise
from .protocol import TextConditioning


class DiffusersBackend:
    """:class:`~metalora_core.training.protocol.FluxBackend` on a diffusers transformer (frozen) of any family."""

    def __init__(self, model: torch.nn.Module, dims, compute_dtype: torch.dtype | None = None) -> None:
        self.model = model.requires_grad_(False).eval()
        self.dims = dims
        self.family = family_of(dims)
        first = next(model.parameters())
        self.device = first.device
        self.dtype = compute_dtype or first.dtype  # what layers compute in (fp8-stored weights: bf16)
        self.has_guidance = bool(getattr(model.config, "guidance_embeds", dims.guidance))
        # A CUDA graph may replay the step unless diffusers hooks run per layer: layer-wise casting (fp8)
        # and offloading swap each weight's storage on every call, which a captured graph cannot follow.
        self.capturable = self.device.type == "cuda" and not hooked_modules(model)

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        storage_dtype: torch.dtype | None = None,
    ) -> DiffusersBackend:
        """Load a diffusers folder (pipeline or transformer) or a single file of any family, offline.

        ``dtype`` is what layers compute in; ``storage_dtype`` (fp8), when given, is what weights are kept in
        between, through diffusers' layer-wise casting. The cast to fp8 happens on the CPU, before the model
        moves to ``device``: the device never holds the model at the compute dtype.
        """
        from ..model_files import load_diffusers_model

        if storage_dtype is None or storage_dtype == dtype:
            model, dims = load_diffusers_model(path, dtype=dtype, device=device)
            return cls(model, dims)
        model, dims = load_diffusers_model(path, dtype=dtype, device="cpu")
        store_layerwise(model, storage_dtype, dtype)
        return cls(model.to(device), dims, compute_dtype=dtype)

    def velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning, guidance: float | None
    ) -> torch.Tensor:
        _, _, h, w = x_t.shape
        if h % 2 or w % 2:
            raise ValueError(
                f"latents must have even height and width for {self.family.label}'s 2x2 packing, got {h}x{w}"
            )
        guide = (1.0 if guidance is None else guidance) if self.has_guidance else None  # None: unguided
        kwargs = self.family.model_inputs(x_t, t, cond, guide, self.dims, self.device, self.dtype)
        with training_sdpa() if torch.is_grad_enabled() else nullcontext():
            out = self.model(**kwargs, return_dict=False)[0]
        return self.family.unpack(out, h, w)

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


def _recompute_contexts():
    """(forward context, recompute context) of a checkpointed block: the recompute, which runs in backward,
    outside the training forward, gets the training attention kernels again."""
    return nullcontext(), training_sdpa()


def _non_reentrant_checkpoint(module, *args):
    """Block checkpointing that recomputes in backward without the reentrant autograd engine.

    No RNG state is stashed: the frozen FLUX runs in eval mode and the heads train without dropout, so a
    block draws no random numbers; reading the CUDA generator per block would also stop a CUDA-graph
    capture of the step (:mod:`.step`).
    """
    return checkpoint(
        partial(module.__call__),
        *args,
        use_reentrant=False,
        context_fn=_recompute_contexts,
        preserve_rng_state=False,
    )
