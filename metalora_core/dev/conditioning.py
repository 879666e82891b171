"""Random precomputed text conditioning fitting a FLUX checkpoint (T5 ``context`` and CLIP ``pooled``), so
the trainer can run without text encoders in tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..model_files import read_model_dims
from ..training.conditioning import save_conditioning
from ..training.protocol import TextConditioning


def random_conditioning(model_path: str | os.PathLike, tokens: int = 16, seed: int = 0) -> TextConditioning:
    dims, _ = read_model_dims(model_path)
    g = torch.Generator().manual_seed(seed)
    pooled = torch.randn(dims.vec_dim, generator=g) if dims.vec_dim else None
    return TextConditioning(torch.randn(tokens, dims.context_dim, generator=g), pooled)


def write_random_conditioning(
    model_path: str | os.PathLike, out: str | os.PathLike, tokens: int = 16, seed: int = 0
) -> Path:
    return save_conditioning(out, random_conditioning(model_path, tokens, seed), {"metalora_dev": "random"})
