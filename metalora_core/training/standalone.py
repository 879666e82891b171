"""What standalone training needs beside the transformer: the family's VAE (to encode the views once) and
the place of every part in a diffusers pipeline folder (FLUX.1-dev's or Qwen-Image's layout), all read
offline."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MetaLoRAError
from ..models import FAMILIES, ModelFamily, family_of
from ..models.flux import FLUX
from .conditioning import has_text_encoders
from .diffusers_backend import DiffusersBackend
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


def _vae_families() -> dict[str, ModelFamily]:
    """diffusers VAE class name -> the family whose transformer reads its latents."""
    return {family.vae_class: family for family in FAMILIES.values()}


def vae_folder_family(path: str | os.PathLike) -> tuple[ModelFamily, str]:
    """The family of a diffusers VAE folder and its VAE class name, from its config.json alone."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise MetaLoRAError(
            f"{path}: not a diffusers VAE folder (needs config.json and weights, like FLUX.1-dev's or "
            "Qwen-Image's vae/)"
        )
    name = json.loads((path / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    known = _vae_families()
    if name not in known:
        raise MetaLoRAError(f"{path}: a {name} VAE; Meta-LoRA reads {' or '.join(known)} VAEs")
    return known[name], name


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers VAE folder: FLUX.1's ``AutoencoderKL`` or Qwen-Image's ``AutoencoderKLQwenImage``."""
    import diffusers

    path = Path(path)
    _, name = vae_folder_family(path)
    try:
        vae = getattr(diffusers, name).from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise MetaLoRAError(f"{path}: could not load the VAE ({exc})") from None
    channels = vae.config.get("latent_channels", vae.config.get("z_dim"))
    if channels != 16:
        raise MetaLoRAError(f"{path}: a FLUX.1 / Qwen-Image VAE has 16 latent channels, this one {channels}")
    return vae.to(device).eval().requires_grad_(False)


def vae_family(vae) -> ModelFamily:
    """The family whose transformer reads this (loaded) VAE's latents."""
    return _vae_families().get(type(vae).__name__, FLUX)


def check_vae_matches(path: str | os.PathLike, dims) -> None:
    """A FLUX.1 VAE with a Qwen-Image transformer (or the reverse) would encode latents the model never
    saw, and train without an error: refuse it before anything is encoded (cached latents included)."""
    theirs, ours = vae_folder_family(path)[0], family_of(dims)
    if theirs.name != ours.name:
        raise MetaLoRAError(
            f"--vae {path}: this is a {theirs.label} VAE but the transformer is {ours.label}; pass "
            f"{ours.label}'s vae/ folder"
        )


def vae_encoder(vae) -> Callable[[torch.Tensor], torch.Tensor]:
    """Images ``(B, 3, H, W)`` in [-1, 1] -> normalised latents ``(B, 16, H/8, W/8)`` (the posterior mean:
    cacheable): FLUX's ``(mean - shift) * scale``, Qwen-Image's per-channel ``(mean - mu) / sigma``."""
    family = vae_family(vae)
    device, dtype = vae.device, vae.dtype
    video = family.video_vae

    def encode(images: torch.Tensor) -> torch.Tensor:
        x = images.to(device, dtype)
        mean = vae.encode(x.unsqueeze(2) if video else x).latent_dist.mode()
        return family.vae_normalize(mean.float().squeeze(2) if video else mean.float(), vae.config)

    return encode


def load_transformer(
    path: str | os.PathLike,
    requested: str,
    device: torch.device,
    bf16_autocast: bool = False,
    say: Callable[[str], None] | None = None,
) -> tuple[DiffusersBackend, Precision]:
    """The transformer (FLUX.1 or Qwen-Image, read from its tensors) as ``--dtype requested`` asks on
    ``device`` (the file's own dtype read from its headers), and the precision chosen; ``say`` hears which,
    before the slow load."""
    from ..model_files import read_model_dims, read_weight_dtype

    precision = choose_precision(requested, device, read_weight_dtype(path), bf16_autocast)
    if say is not None:
        noun = family_of(read_model_dims(path)[0]).noun
        say(f"loading {noun} from {path} ({precision.describe()}, on {device}; this takes a while)")
    backend = DiffusersBackend.from_path(path, precision.compute, device, storage_dtype=precision.storage)
    return backend, precision
