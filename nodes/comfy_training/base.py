"""What every family's in-graph trainer shares: loading through ComfyUI, heads on a clone, checkpointing.

The training loop (``metalora_core.training``) only sees the protocol (``dims``, ``device``, ``dtype``,
``velocity``, ``adapters``, ``set_gradient_checkpointing``). :class:`ComfyBackend` maps the family-blind part
of it onto ComfyUI; a family (:mod:`.backend` for FLUX.1, :mod:`.qwen_image` for Qwen-Image) adds how its
model is recognised and sized, its block replacements and its velocity call:

- the model is loaded by ``comfy.model_management.load_models_gpu`` on a patcher CLONE, so fp8, GGUF and
  low-VRAM (partial) loading work exactly as for sampling; no file is ever opened here;
- heads enter through out-of-place block replacements registered with ``set_model_patch_replace`` on a
  clone that exists only inside :meth:`ComfyBackend.adapters`: the model object is never edited;
- every forward runs with the training attention of :mod:`.attention` (sampling keeps ComfyUI's choice).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import comfy.model_management
import torch
from torch import nn

from ...metalora_core.adapter import IdentityHead
from ...metalora_core.errors import MetaLoRAError
from ...metalora_core.training.protocol import TextConditioning
from .attention import with_training_attention

SUPPORTED = "FLUX.1 (e.g. flux1-dev) and Qwen-Image (qwen_image)"


def unsupported_model(model_patcher) -> MetaLoRAError:
    """The error for a MODEL of no supported family, naming what it is and what would work."""
    name = type(getattr(model_patcher, "model", None)).__name__
    return MetaLoRAError(
        f"MODEL input: Meta-LoRA trains {SUPPORTED} models, this MODEL is '{name}'. Load one of them with "
        "Load Diffusion Model (UNETLoader)."
    )


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


class ComfyBackend:
    """The protocol on a model ComfyUI loaded; subclasses are one base-model family each."""

    label: ClassVar[str]  # the family as messages name it ("FLUX.1", "Qwen-Image")

    @staticmethod
    def diffusion_model_of(model_patcher) -> nn.Module:
        """The family's diffusion model inside ``model_patcher``, or a clear error naming the MODEL input."""
        raise NotImplementedError

    @staticmethod
    def dims_of(diffusion_model: nn.Module) -> Any:
        """The family's sizes (``FluxDims`` / ``QwenImageDims``) of a loaded diffusion model."""
        raise NotImplementedError

    def block_replacements(
        self, heads: Mapping[str, IdentityHead], checkpointing: Callable[[], bool]
    ) -> Mapping[tuple[str, int], Callable[[dict, dict], dict]]:
        """``{(kind, index): replacement}`` for ``set_model_patch_replace(fn, "dit", kind, index)``."""
        raise NotImplementedError

    def velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning, guidance: float | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def __init__(self, model_patcher, memory_required: int = 0) -> None:
        self.diffusion_model_of(model_patcher)
        self.patcher = model_patcher.clone()  # the incoming MODEL keeps its own options untouched
        self.diffusion_model = self.patcher.model.diffusion_model
        self.dims = self.dims_of(self.diffusion_model)
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
                f"MODEL input: another node already replaces {self.label} block(s) {sorted(existing)[:3]}; "
                "train the identity on the plain model and apply the other patches afterwards"
            )
        for (kind, index), fn in self.block_replacements(heads, lambda: self.checkpointing).items():
            patched.set_model_patch_replace(fn, "dit", kind, index)
        previous, self._active = self._active, patched
        try:
            yield
        finally:
            self._active = previous

    def forward_options(self, t: torch.Tensor, batch: int) -> tuple[torch.Tensor, dict]:
        """The flow times as ComfyUI's sampler passes them (float32, one per sample) and the
        ``transformer_options`` of the forward: the active clone's patches and the training attention."""
        patcher = self._active if self._active is not None else self.patcher
        options = with_training_attention(patcher.model_options.get("transformer_options", {}))
        t = t.to(self.device, torch.float32).reshape(batch)
        options.update({"sigmas": t, "cond_or_uncond": [0]})
        return t, options
