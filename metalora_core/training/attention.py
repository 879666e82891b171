"""The attention kernels a training forward may use: flash, then memory-efficient, then math. Never cuDNN.

PyTorch picks cuDNN's fused attention for FLUX's shapes on Hopper GPUs, and its backward fails there: NaN
gradients, or ``CUBLAS_STATUS_EXECUTION_FAILED`` whose cause (``mha_graph.execute(...).is_good()``) shows
with ``CUDA_LAUNCH_BLOCKING=1`` (PyTorch issues #122695, #134001, #190321; measured on an H200 in
docs/performance.md). Flash, memory-efficient and math attention give the same loss there.

The restriction is a context (:func:`training_sdpa`) that every training forward enters, and that every
recompute under gradient checkpointing enters again (the recompute runs in backward, outside the
forward's context). The backward of an attention call is the backward of the kernel its forward chose,
so restricting the forward is enough. Sampling never enters it and keeps PyTorch's (or ComfyUI's) choice.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch


def training_backends() -> list:
    """SDPA backends allowed in training, in priority order (PyTorch's ``SDPBackend`` members)."""
    from torch.nn.attention import SDPBackend

    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


_lock = threading.Lock()
_open: list[AbstractContextManager] = []  # the one restriction in force while any training forward runs
_depth = 0


def _restriction() -> AbstractContextManager:
    from torch.nn.attention import sdpa_kernel

    backends = training_backends()
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:  # torch >= 2.6
        return sdpa_kernel(backends, set_priority=True)
    # older torch: cuDNN off, the rest in PyTorch's order (flash, efficient, math)
    return sdpa_kernel(backends)


@contextmanager
def training_sdpa() -> Iterator[None]:
    """Inside: ``scaled_dot_product_attention`` may use flash, memory-efficient or math, in that order.

    PyTorch's switches are process-wide, and ``sdpa_kernel`` restores what it found on exit. Two threads
    entering and leaving it interleaved (meta-training's thread stand-in for ranks, a UI thread beside a
    worker) would then leave cuDNN off for good. So the first entrant applies the restriction and the last
    one to leave lifts it, whatever the threads and the nesting.
    """
    global _depth
    with _lock:
        if _depth == 0:
            context = _restriction()
            context.__enter__()
            _open.append(context)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _open.pop().__exit__(None, None, None)


def heads_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
    skip_reshape: bool = False,
    skip_output_reshape: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Multi-head SDPA under :func:`training_sdpa`, with the calling convention of ComfyUI's attention
    functions: ``(B, L, H*D)`` tensors (or ``(B, H, L, D)`` with ``skip_reshape``), output ``(B, L, H*D)``
    (or ``(B, H, L, D)`` with ``skip_output_reshape``), a mask of 2, 3 or 4 dimensions; with ``enable_gqa``
    keys and values may have fewer heads than queries."""
    if skip_reshape:
        b, _, _, dim_head = q.shape
    else:
        b, _, width = q.shape
        dim_head = width // heads
        q, k, v = (t.reshape(b, t.shape[1], -1, dim_head).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
    extra: dict[str, object] = {} if scale is None else {"scale": scale}
    if enable_gqa:
        extra["enable_gqa"] = True
    with training_sdpa():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, **extra)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(b, -1, out.shape[1] * dim_head)


__all__ = ["heads_attention", "training_backends", "training_sdpa"]
