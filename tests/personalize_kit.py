"""The tiny models every `metalora personalize` CLI test trains on, built by the `dev` commands, and the
options that point the command at them (one place, so the CLI tests cannot drift apart)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from metalora_core.cli.main import main


def write_kit(root: Path, photo_hw: tuple[int, int]) -> Path:
    """tiny FLUX, random LoMD, tiny VAE, random text features and a random photo of ``photo_hw`` pixels."""
    flux = str(root / "flux.safetensors")
    assert main(["dev", "tiny-flux", "--format", "bfl", "--out", flux]) == 0
    assert main(["dev", "random-lomd", "--model", flux, "--out", str(root / "lomd.safetensors")]) == 0
    assert main(["dev", "tiny-vae", "--out", str(root / "vae")]) == 0
    assert main(["dev", "random-conditioning", "--model", flux, "--out", str(root / "cond.safetensors")]) == 0
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (*photo_hw, 3), dtype=np.uint8)).save(root / "photo.png")
    return root


def personalize_args(root: Path, out, *rest: str) -> list[str]:
    """``personalize`` on the kit in ``root`` writing ``out``, then ``rest``."""
    return [
        "personalize",
        "--flux", str(root / "flux.safetensors"),
        "--lomd", str(root / "lomd.safetensors"),
        "--image", str(root / "photo.png"),
        "--vae", str(root / "vae"),
        "--conditioning", str(root / "cond.safetensors"),
        "--out", str(out),
        *rest,
    ]  # fmt: skip
