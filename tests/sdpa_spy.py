"""A spy inside a diffusers FLUX: PyTorch's SDPA switches at the moment each attention module runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def sdpa_flags() -> tuple[bool, bool, bool, bool]:
    """(cuDNN, flash, memory-efficient, math) allowed, as PyTorch's dispatcher sees them right now."""
    b = torch.backends.cuda
    return b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled()


TRAINING_FLAGS = (False, True, True, True)


@contextmanager
def attention_spy(model: torch.nn.Module) -> Iterator[tuple[list[object], int]]:
    """Yields ``(seen, n)``: the flags of every attention call (a pre-hook on each ``*.attn`` module), and
    how many attention modules the model has; tests append markers (``"backward"``) to ``seen`` themselves."""
    seen: list[object] = []
    modules = [m for n, m in model.named_modules() if n.endswith(".attn")]
    assert modules, "the model has no attention module to spy on"
    handles = [m.register_forward_pre_hook(lambda *_: seen.append(sdpa_flags())) for m in modules]
    try:
        yield seen, len(modules)
    finally:
        for h in handles:
            h.remove()
