"""How much memory a training step needs beside the weights, and whether to checkpoint blocks because of it.

The estimate is deliberately simple (tokens x width x a per-block count of saved activations) and errs on
the large side: it decides how much of the model ComfyUI keeps resident, and whether the standalone
trainer turns gradient checkpointing on by itself. Measured against it on an H200 (docs/performance.md):
FLUX.1-dev at 512 px keeps ~6 GB of activations without checkpointing, ~1 GB with it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..targets import FluxDims
from .precision import hooked_modules

# Saved activations per token and hidden unit for one FLUX block's forward + backward: qkv (3), q/k after
# norm and RoPE (2 x 2), attention output (1), projections and MLP input/hidden/GELU (1 + 2 + 4 + 4), norms and
# modulated inputs (4), residual streams (2). Rounded up to 24; the estimate only decides how much of the
# model ComfyUI keeps resident, and low-VRAM streaming absorbs the error.
_PER_BLOCK = 24


def activation_bytes(
    dims: FluxDims,
    latent_hw: tuple[int, int],
    text_tokens: int,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    checkpointing: bool = True,
) -> int:
    """Activation memory of one training step, to reserve when loading the model (``memory_required``).

    Without checkpointing every block keeps its activations until backward; with it only each block's
    inputs stay, and one block at a time is recomputed.
    """
    tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2) + text_tokens
    unit = batch * tokens * dims.hidden * torch.finfo(dtype).bits // 8
    blocks = dims.depth + dims.depth_single
    per_block = _PER_BLOCK * unit * max(1, dims.mlp_hidden // (4 * dims.hidden))
    kept = blocks * 2 * unit + per_block if checkpointing else blocks * per_block
    attention = batch * dims.heads * tokens * tokens * 4  # one score matrix (math attention, float32)
    return int(kept + attention + 64 * unit)


def layerwise_copy_bytes(model: nn.Module, compute: torch.dtype) -> int:
    """Bytes of the compute-dtype weight copies fp8 layer-wise casting makes, kept for backward.

    A linear layer's backward needs its weight; under layer-wise casting that is the compute-dtype copy made
    for the forward, so without checkpointing every layer's copy stays until backward (the fp8 storage
    saves nothing while training). With checkpointing only the recomputed block's copies live at once.
    """
    return (
        sum(p.numel() for m in hooked_modules(model) for p in m.parameters(recurse=False)) * compute.itemsize
    )


def cuda_free_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device as the driver reports it."""
    return int(torch.cuda.mem_get_info(device)[0])


def decide_checkpointing(
    requested: str,
    device: torch.device,
    need_without: int,
    need_with: int,
    free_bytes: Callable[[torch.device], int] = cuda_free_bytes,
    margin: float = 0.9,
) -> tuple[bool, str]:
    """(checkpointing on?, the reason in words) for ``--checkpointing auto|on|off``.

    ``auto`` turns it on when the step's memory without checkpointing (``need_without``) does not fit in
    ``margin`` of the device's free memory (the model already loaded); on the CPU it stays off.
    """
    gib = 2**30
    if requested in ("on", "off"):
        return requested == "on", f"{requested} (as asked)"
    if device.type != "cuda":
        return False, "off (auto: on the CPU memory is not the limit)"
    free = free_bytes(device)
    if need_without <= margin * free:
        return False, (
            f"off (auto: a step needs ~{need_without / gib:.1f} GiB without it, {free / gib:.1f} GiB are free)"
        )
    fits = (
        ""
        if need_with <= margin * free
        else "; even so it may not fit: lower --resolution or use --dtype float8_e4m3fn"
    )
    return True, (
        f"on (auto: a step needs ~{need_without / gib:.1f} GiB without it, ~{need_with / gib:.1f} GiB with it, "
        f"{free / gib:.1f} GiB are free{fits})"
    )


__all__ = ["activation_bytes", "cuda_free_bytes", "decide_checkpointing", "layerwise_copy_bytes"]
