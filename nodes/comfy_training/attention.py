"""The attention the trainer runs, whatever ComfyUI chose globally for sampling.

ComfyUI picks one attention implementation at start-up (PyTorch SDPA, sub-quadratic, split, sage, flash,
xformers). Two of them break training: sub-quadratic chunks the keys when free memory is low and then uses
``torch.exp(..., out=...)``, which autograd cannot differentiate; split picks its slicing from free memory at
call time, so a gradient-checkpoint recompute can slice differently from the forward and fail with
``CheckpointError`` (ComfyUI issue #15845). Sage/int8 kernels are not differentiable either.

Training therefore passes ComfyUI's own ``optimized_attention_override`` hook in the ``transformer_options``
of its forward only: every attention call then runs PyTorch's ``scaled_dot_product_attention`` (through
ComfyUI's registered "pytorch" function), which autograd differentiates and whose kernel choice depends on
the inputs only, so a recompute is identical. Sampling never sees the override and keeps ComfyUI's choice.
"""

from __future__ import annotations

OVERRIDE_KEY = "optimized_attention_override"


def training_attention(func, *args, **kwargs):
    """``optimized_attention_override``: ignore ComfyUI's choice ``func`` and run its "pytorch" attention."""
    from comfy.ldm.modules.attention import get_attention_function

    return get_attention_function("pytorch")(*args, **kwargs)


def with_training_attention(transformer_options: dict) -> dict:
    """A copy of ``transformer_options`` whose attention is :func:`training_attention` (any other override a
    node set for sampling, e.g. sage attention, is left out of training only)."""
    return {**transformer_options, OVERRIDE_KEY: training_attention}
