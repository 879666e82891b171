"""What standalone training needs beside the transformer: the FLUX VAE (to encode the views once) and
the place of every part in a diffusers pipeline folder (FLUX.1-dev's layout), all read offline."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MetaLoRAError
from .conditioning import has_text_encoders
from .diffusers_backend import DiffusersFluxBackend
from .precision import Precision, choose_precision


@dataclass
class FluxParts:
    transformer: Path  # a BFL / diffusers file or a diffusers folder
    vae: Path | None  # a diffusers AutoencoderKL folder
    text_encoders: Path | None  # a pipeline folder with both text encoders


def find_parts(flux: str | os.PathLike, vae: str | os.PathLike | None = None) -> FluxParts:
    """Locate the transformer, VAE and text encoders; an explicit ``vae`` wins over the pipeline's."""
    flux = Path(flux)
    pipeline = flux.is_dir() and (flux / "transformer").is_dir()
    vae_path = Path(vae) if vae else (flux / "vae" if pipeline and (flux / "vae").is_dir() else None)
    return FluxParts(flux, vae_path, flux if pipeline and has_text_encoders(flux) else None)


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL

    path = Path(path)
    if not (path / "config.json").is_file():
        raise MetaLoRAError(
            f"{path}: not a diffusers VAE folder (needs config.json and weights, like FLUX.1-dev's vae/)"
        )
    try:
        vae = AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise MetaLoRAError(f"{path}: could not load the VAE ({exc})") from None
    if vae.config.latent_channels != 16:
        raise MetaLoRAError(
            f"{path}: a FLUX VAE has 16 latent channels, this one {vae.config.latent_channels}"
        )
    return vae.to(device).eval().requires_grad_(False)


def vae_encoder(vae) -> Callable[[torch.Tensor], torch.Tensor]:
    """Images in [-1, 1] -> FLUX latents ``(mean - shift) * scale`` (the posterior mean: cacheable)."""
    scale = float(vae.config.scaling_factor)
    shift = float(vae.config.shift_factor or 0.0)
    device, dtype = vae.device, vae.dtype

    def encode(images: torch.Tensor) -> torch.Tensor:
        mean = vae.encode(images.to(device, dtype)).latent_dist.mode()
        return (mean.float() - shift) * scale

    return encode


def load_flux(
    path: str | os.PathLike,
    requested: str,
    device: torch.device,
    bf16_autocast: bool = False,
    say: Callable[[str], None] | None = None,
) -> tuple[DiffusersFluxBackend, Precision]:
    """FLUX as ``--dtype requested`` asks on ``device`` (the file's own dtype read from its headers), and
    the precision chosen; ``say`` hears which, before the slow load."""
    from ..flux_model import read_weight_dtype

    precision = choose_precision(requested, device, read_weight_dtype(path), bf16_autocast)
    if say is not None:
        say(f"loading FLUX from {path} ({precision.describe()}, on {device}; this takes a while)")
    backend = DiffusersFluxBackend.from_path(path, precision.compute, device, storage_dtype=precision.storage)
    return backend, precision
