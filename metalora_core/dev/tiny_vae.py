"""A tiny diffusers ``AutoencoderKL`` shaped like FLUX's VAE (16 latent channels, 8x downsampling, FLUX's
scaling and shift factors), so the standalone trainer's VAE path runs in tests without real weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch

FLUX_VAE_SCALE, FLUX_VAE_SHIFT = 0.3611, 0.1159


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=FLUX_VAE_SCALE,
        shift_factor=FLUX_VAE_SHIFT,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )


def write_tiny_vae(out: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny FLUX-like VAE as a diffusers folder (``config.json`` + safetensors)."""
    with torch.random.fork_rng(devices=[]):
        vae = tiny_vae(seed)
    out = Path(out)
    vae.save_pretrained(str(out), safe_serialization=True)
    return out
