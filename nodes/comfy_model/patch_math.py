"""The weight-patch math of MetaLoRAApply, free of ComfyUI imports so it is unit-tested on its own.

ComfyUI calls a weight adapter with the layer's weight already cast to its *intermediate* dtype (float32 by
default) on the compute device; the adapter adds its change and ComfyUI casts back to the storage dtype
(fp8 / bf16 / GGUF dequantized). The low-rank product is taken in the small order ``(Up @ Mid) @ Down``:
``out x rank_mid x rank_down`` then ``x in``, never an ``out x in`` intermediate beyond the result itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...metalora_core.adapter import delta_weight

Cast = Callable[[torch.Tensor, torch.device, torch.dtype], torch.Tensor]


def _plain_cast(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.to(device=device, dtype=dtype)


def identity_delta(
    down: torch.Tensor,
    mid: torch.Tensor,
    up: torch.Tensor,
    factor: float,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    cast: Cast = _plain_cast,
) -> torch.Tensor:
    """``factor * Up @ Mid @ Down`` (``factor = strength * scale``) computed in ``dtype`` on ``device``."""
    device = torch.device(device)
    return delta_weight(*(cast(t, device, dtype) for t in (down, mid, up)), factor)


def add_identity_delta(
    weight: torch.Tensor,
    down: torch.Tensor,
    mid: torch.Tensor,
    up: torch.Tensor,
    factor: float,
    function: Callable[[torch.Tensor], torch.Tensor] | None = None,
    intermediate_dtype: torch.dtype = torch.float32,
    cast: Cast = _plain_cast,
) -> torch.Tensor:
    """Add ``function(factor * Up @ Mid @ Down)`` to ``weight`` in place (ComfyUI's patch contract) and
    return it. ``function`` is ComfyUI's per-patch transform (identity unless a patch key sets one)."""
    if factor == 0.0:
        return weight
    delta = identity_delta(down, mid, up, factor, weight.device, intermediate_dtype, cast)
    if delta.shape != weight.shape:
        raise ValueError(
            f"Meta-LoRA delta {tuple(delta.shape)} does not match the weight {tuple(weight.shape)}"
        )
    delta = delta.to(weight.dtype)
    weight += function(delta) if function is not None else delta
    return weight


def bypass_output(
    x: torch.Tensor,
    down: torch.Tensor,
    mid: torch.Tensor,
    up: torch.Tensor,
    factor: float,
    cast: Cast = _plain_cast,
) -> torch.Tensor:
    """The adapter's output ``factor * Up(Mid(Down(x)))`` for bypass mode (base weight never read)."""
    dtype = x.dtype if x.is_floating_point() else torch.float32
    u, m, d = (cast(t, x.device, dtype) for t in (up, mid, down))
    h = torch.nn.functional.linear(x, d)
    h = torch.nn.functional.linear(h, m)
    return torch.nn.functional.linear(h, u) * factor
