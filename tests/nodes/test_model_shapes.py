"""Logical weight shapes: a GGUF-quantized weight is a byte tensor whose real shape is ``tensor_shape``."""

from __future__ import annotations

import torch


class _Patcher:
    """A ModelPatcher as ComfyUI-GGUF leaves it: real parameters on ``.model``, but a state dict of meta
    placeholders with the packed byte shape (what ComfyUI-GGUF's ``ggml_save_to_state_dict`` writes)."""

    def __init__(self, params):
        self.model = torch.nn.Module()
        self.params = params
        self.model.named_parameters = lambda: iter(params.items())

    def model_state_dict(self):
        return {k: torch.zeros_like(v, device="meta") for k, v in self.params.items()}


def test_gguf_tensor_shape_wins_over_the_packed_bytes(pack_module):
    shapes = pack_module("nodes.comfy_model.model_shapes")
    q8 = torch.zeros(384, 136, dtype=torch.uint8)  # Q8_0 bytes of a (384, 128) weight: 34 bytes per 32 values
    q8.tensor_shape = torch.Size([384, 128])
    plain = torch.zeros(128, 128)
    assert shapes.logical_shape(q8) == (384, 128) and shapes.logical_shape(plain) == (128, 128)
    model = _Patcher(
        {
            "diffusion_model.double_blocks.0.img_attn.qkv.weight": q8,
            "diffusion_model.double_blocks.0.img_attn.proj.weight": plain,
            "diffusion_model.double_blocks.0.img_attn.proj.bias": torch.zeros(128),
        }
    )
    assert shapes.model_target_shapes(model) == {
        "double_blocks.0.img_attn.qkv": (384, 128),
        "double_blocks.0.img_attn.proj": (128, 128),
    }
