"""``FluxBackend`` over the FLUX model ComfyUI already loaded (a ``ModelPatcher``): the in-graph trainer.

The training loop (``metalora_core.training``) only sees the protocol; this class maps it onto ComfyUI:

- the model is loaded by ``comfy.model_management.load_models_gpu`` on a patcher CLONE, so fp8, GGUF and
  low-VRAM (partial) loading work exactly as for sampling; no file is ever opened here;
- the velocity is ComfyUI FLUX's raw output: ``Flux`` is fed unpacked latents ``(B, 16, H, W)``, the
  timestep as the flow time ``t = sigma`` in [0, 1] (ComfyUI's ``ModelSamplingFlux.timestep`` is the
  identity; the model scales by 1000 inside its embedding, as BFL and diffusers do), the distilled guidance
  as a plain number (3.5, not multiplied; ``None`` = 1.0 like the standalone backend), context and pooled vector in the compute dtype. ComfyUI's
  ``calculate_denoised(x_t) = x_t - sigma * out`` confirms ``out = noise - x0``, the protocol's velocity;
- heads enter through out-of-place block replacements registered with ``set_model_patch_replace`` on a
  clone that exists only inside :meth:`adapters` (see :mod:`.patches`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import comfy.ldm.flux.model
import comfy.model_base
import comfy.model_management
import torch
from torch import nn

from ...metalora_core.adapter import IdentityHead
from ...metalora_core.errors import MetaLoRAError
from ...metalora_core.targets import FluxDims
from ...metalora_core.training.protocol import TextConditioning
from .attention import with_training_attention
from .patches import replacements


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
        raise MetaLoRAError(
            f"MODEL input: Meta-LoRA trains FLUX.1 models, this MODEL is '{name}'. "
            "Load flux1-dev (or another FLUX.1) with Load Diffusion Model (UNETLoader)."
        )
    p = dm.params
    if isinstance(base, comfy.model_base.Flux2) or p.global_modulation or p.yak_mlp or p.mlp_silu_act:
        raise MetaLoRAError(
            f"MODEL input: '{name}' is a FLUX variant with a different block layout; Meta-LoRA supports FLUX.1"
        )
    if p.patch_size != 2 or p.in_channels != 16:
        raise MetaLoRAError(f"MODEL input: FLUX with {p.in_channels} latent channels is not FLUX.1 (16)")
    return dm


def materialize_inference_tensors(module: nn.Module, device: torch.device | None = None) -> int:
    """Replace parameters / buffers created under ``torch.inference_mode`` by normal copies (same values).

    ComfyUI runs nodes under inference mode, so the weights of a model loaded there are inference tensors,
    which autograd refuses to save for backward (it must, for the input gradient of every linear). ComfyUI
    clones them the same way itself (``comfy.utils.set_attr_param``). Only tensors on ``device`` (the compute
    device) are used in place; weights kept elsewhere (offloaded, or streamed by the dynamic loader) are cast
    to fresh copies on every forward, so they are left alone. One tensor at a time: the peak is one layer.
    """
    count = 0

    def on_device(t: torch.Tensor) -> bool:
        if device is None:
            return True
        return t.device.type == device.type and (device.index is None or t.device.index == device.index)

    def wanted(t: torch.Tensor | None) -> bool:
        return t is not None and t.is_inference() and on_device(t)

    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if wanted(p):
                m._parameters[name] = nn.Parameter(p.clone(), requires_grad=False)
                count += 1
        for name, b in list(m._buffers.items()):
            if wanted(b):
                m._buffers[name] = b.clone()
                count += 1
    return count


class ComfyFluxBackend:
    """The protocol's ``velocity`` / ``adapters`` / ``set_gradient_checkpointing`` on a ComfyUI FLUX.1."""

    def __init__(self, model_patcher, memory_required: int = 0) -> None:
        check_flux1(model_patcher)
        self.patcher = model_patcher.clone()  # the incoming MODEL keeps its own options untouched
        self.diffusion_model = self.patcher.model.diffusion_model
        self.dims = flux_dims(self.diffusion_model)
        self.device = torch.device(self.patcher.load_device)
        self.dtype = self.patcher.model.get_dtype_inference()
        self.memory_required = int(memory_required)
        self.checkpointing = False
        self._active = None  # the patched clone while adapters() is open

    # -- loading ---------------------------------------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[None]:
        """Model on the compute device through ComfyUI's memory manager, training flags set; undone on exit.

        ``memory_required`` reserves room for activations: ComfyUI then keeps as many weights on the GPU
        as fit and streams the rest per layer (low-VRAM mode), exactly as when sampling.
        """
        comfy.model_management.load_models_gpu([self.patcher], memory_required=self.memory_required)
        materialize_inference_tensors(self.diffusion_model, self.device)
        was_training = comfy.model_management.in_training
        comfy.model_management.in_training = True  # ComfyUI's autograd-safe RoPE path
        self.patcher.pre_run()
        try:
            yield
        finally:
            comfy.model_management.in_training = was_training
            self.patcher.cleanup()
            self._active = None

    # -- protocol --------------------------------------------------------------------------------------

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.checkpointing = bool(enabled)

    @contextmanager
    def adapters(self, heads: Mapping[str, IdentityHead]) -> Iterator[None]:
        patched = self.patcher.clone()
        existing = (
            patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        )
        if existing:
            raise MetaLoRAError(
                f"MODEL input: another node already replaces FLUX block(s) {sorted(existing)[:3]}; train the "
                "identity on the plain model and apply the other patches afterwards"
            )
        for (kind, index), fn in replacements(
            self.diffusion_model, heads, lambda: self.checkpointing
        ).items():
            patched.set_model_patch_replace(fn, "dit", kind, index)
        previous, self._active = self._active, patched
        try:
            yield
        finally:
            self._active = previous

    def velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning, guidance: float | None
    ) -> torch.Tensor:
        b = x_t.shape[0]
        context, pooled = cond.batch(b, self.device, self.dtype)
        g = None
        if self.dims.guidance:  # None means 1.0 (unguided), as in the standalone DiffusersFluxBackend
            g = torch.full(
                (b,), 1.0 if guidance is None else float(guidance), device=self.device, dtype=self.dtype
            )
        patcher = self._active if self._active is not None else self.patcher
        options = with_training_attention(patcher.model_options.get("transformer_options", {}))
        t = t.to(self.device, torch.float32).reshape(b)
        options.update({"sigmas": t, "cond_or_uncond": [0]})
        return self.diffusion_model(
            x_t.to(self.device, self.dtype),
            t,
            context=context,
            y=pooled,
            guidance=g,
            transformer_options=options,
        )
