"""ComfyUI weight adapter for a Meta-LoRA identity: ``W + strength * scale * Up @ Mid @ Down``.

It plugs into ComfyUI's own patch machinery (``ModelPatcher.add_patches``), so ComfyUI decides when and
where weights are patched: fp8 / GGUF / low-VRAM offloading and weight streaming keep working, and a clone
carries the patch only as long as the node's output lives. The math is in :mod:`.patch_math` (tested
without ComfyUI).
"""

from __future__ import annotations

import torch
from comfy import model_management
from comfy.weight_adapter import WeightAdapterBase

from .patch_math import add_identity_delta, bypass_output


class MetaLoRAWeightAdapter(WeightAdapterBase):
    """One target layer's identity change. ``weights = (down, mid, up, scale)``.

    The constructor signature ``(loaded_keys, weights)`` is what ComfyUI uses to rebuild an adapter when it
    prefetches patch tensors to the compute device, so the scale travels inside ``weights``.
    """

    name = "metalora"

    def __init__(self, loaded_keys: set[str], weights: tuple) -> None:
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def load(cls, x, lora, alpha, dora_scale):  # not loaded from LoRA files: built by MetaLoRAApply
        return None

    def calculate_shape(self, key):
        return None

    def calculate_weight(
        self,
        weight,
        key,
        strength,
        strength_model,
        offset,
        function,
        intermediate_dtype=torch.float32,
        original_weight=None,
    ):
        down, mid, up, scale = self.weights
        return add_identity_delta(
            weight,
            down,
            mid,
            up,
            float(strength) * float(scale),
            function,
            intermediate_dtype,
            model_management.cast_to_device,
        )

    def h(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        down, mid, up, scale = self.weights
        return bypass_output(
            x, down, mid, up, float(self.multiplier) * float(scale), model_management.cast_to_device
        ).to(base_out.dtype)
