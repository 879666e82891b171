"""What the demo runs on when the user gives nothing: tiny models built on the spot and a real face photo
that an installed package ships. Nothing is downloaded."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import MetaLoRAError

DEMO_PHOTO = "Tom_Hanks_54745.png"  # insightface's sample face (a 112 px aligned crop), installed with it


def packaged_photo() -> Path:
    """insightface's bundled face photo: every install of the face features has it."""
    import importlib.util

    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        raise MetaLoRAError(
            "metalora demo uses the face photo that insightface ships, and insightface is not installed; "
            "install it (pip install insightface) or give --image PHOTO"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / DEMO_PHOTO
    if not path.is_file():
        raise MetaLoRAError(f"{path}: insightface's sample photo is missing; give --image PHOTO")
    return path


def reference_stand_in(photo: Path, out: Path, marker: bool = False) -> Path:
    """A mirrored copy standing in for "another photo of the person" (R-FaceSim never scores against the
    training photo itself). Labelled as such in the report: a real run uses the person's other photos.
    ``marker``: draw the frame the tiny test detector reads as a face (it finds nothing in real photos)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{photo.stem}_mirrored.png"
    image = np.asarray(ImageOps.mirror(Image.open(photo).convert("RGB")))
    if marker:
        from ..dev.tiny_faces import paint_markers

        image = paint_markers(image, [((320, 320), 128)])
    Image.fromarray(image).save(path)
    return path


@dataclass
class TinyKit:
    flux: Path
    vae: Path
    conditioning: Path
    face_root: Path
    face_model: str
    identities: Path


def build_tiny_kit(root: Path, seed: int = 0, identities: int = 8, images: int = 4) -> TinyKit:
    """A tiny FLUX (BFL file), a FLUX-shaped VAE, random text features, tiny ONNX face models and a set of
    drawn identities for meta-training: the `metalora dev ...` builders, called in-process."""
    from ..dev.conditioning import write_random_conditioning
    from ..dev.synthetic_identities import write_synthetic_identities
    from ..dev.tiny_faces import write_tiny_face_models
    from ..dev.tiny_flux import TINY_DIMS, write_tiny_flux
    from ..dev.tiny_vae import write_tiny_vae

    root.mkdir(parents=True, exist_ok=True)
    flux = write_tiny_flux(root / "tiny_flux.safetensors", "bfl", TINY_DIMS, seed)
    vae = write_tiny_vae(root / "tiny_vae", seed)
    cond = write_random_conditioning(flux, root / "prompt.safetensors", 16, seed)
    write_tiny_face_models(root / "face_models", "tiny", seed)
    ids = write_synthetic_identities(root / "identities", identities, images, 128, seed)
    return TinyKit(Path(flux), Path(vae), Path(cond), root / "face_models", "tiny", Path(ids))


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path
