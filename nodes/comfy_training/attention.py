"""The attention the trainer runs, whatever ComfyUI chose globally for sampling.

ComfyUI picks one attention implementation at start-up (PyTorch SDPA, sub-quadratic, split, sage, flash,
xformers). Two of them break training: sub-quadratic chunks the keys when free memory is low and then uses
``torch.exp(..., out=...)``, which autograd cannot differentiate; split picks its slicing from free memory at
call time, so a gradient-checkpoint recompute can slice differently from the forward and fail with
``CheckpointError`` (ComfyUI issue #15845). Sage/int8 kernels are not differentiable either.

Training therefore passes ComfyUI's own ``optimized_attention_override`` hook in the ``transformer_options``
of its forward only: every attention call then runs PyTorch's ``scaled_dot_product_attention`` with the
calling convention of ComfyUI's "pytorch" attention, restricted to flash, memory-efficient or math kernels
(``metalora_core.training.attention``): autograd differentiates them, their choice depends on the inputs
only (so a checkpoint recompute, which calls the override again, is identical), and cuDNN's fused
attention, whose backward fails on Hopper GPUs, is never used. ComfyUI's own "pytorch" function would not
do: it enters ``sdpa_kernel`` itself with cuDNN second in line. Sampling never sees the override and keeps
ComfyUI's choice.
"""

from __future__ import annotations

from ...metalora_core.training.attention import heads_attention

OVERRIDE_KEY = "optimized_attention_override"


def training_attention(
    func,
    q,
    k,
    v,
    heads,
    mask=None,
    attn_precision=None,
    skip_reshape=False,
    skip_output_reshape=False,
    **kwargs,
):
    """``optimized_attention_override``: ignore ComfyUI's choice ``func``; SDPA without cuDNN instead."""
    return heads_attention(
        q,
        k,
        v,
        heads,
        mask,
        skip_reshape,
        skip_output_reshape,
        kwargs.get("scale"),
        bool(kwargs.get("enable_gqa")),
    )


def with_training_attention(transformer_options: dict) -> dict:
    """A copy of ``transformer_options`` whose attention is :func:`training_attention` (any other override a
    node set for sampling, e.g. sage attention, is left out of training only)."""
    return {**transformer_options, OVERRIDE_KEY: training_attention}
