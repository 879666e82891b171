"""Logical weight shapes of a loaded ComfyUI model, GGUF included: the one helper every node uses.

ComfyUI-GGUF keeps quantized weights as byte tensors whose ``.shape`` is the packed storage (e.g.
``(3072, 3456)`` uint8 for a Q8_0 ``(3072, 3072)`` weight) and stores the real shape as the tensor's
``tensor_shape`` attribute. Anything that sizes an adapter from a MODEL must read the logical shape.

The shapes come from the model's parameters, not from ``model_state_dict()``: for a quantized layer
ComfyUI-GGUF's state dict holds a placeholder (``zeros_like`` on the meta device, VRAM estimation only) that
has the packed byte shape and no ``tensor_shape``. ComfyUI's own quantized weights (``QuantizedTensor``:
fp8 scaled, NVFP4, MXFP8, int8) report their logical shape as ``.shape``.
"""

from __future__ import annotations

from .patch_plan import target_shapes


def logical_shape(tensor) -> tuple[int, ...]:
    """The shape a weight has for the model's maths (``tensor_shape`` of a GGUF tensor, else ``shape``)."""
    shape = getattr(tensor, "tensor_shape", None)
    return tuple(int(s) for s in (shape if shape is not None else tensor.shape))


def model_target_shapes(model) -> dict[str, tuple[int, int]]:
    """``{canonical target: (out, in)}`` of a ComfyUI ModelPatcher, logical shapes (no weight is read)."""
    return target_shapes({k: logical_shape(v) for k, v in model.model.named_parameters()})
