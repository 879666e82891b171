"""Locate and load a transformer of any supported family (FLUX.1, Qwen-Image) for the standalone backend:
a single file (BFL / ComfyUI / diffusers names) or a diffusers folder. The family is read from the tensor
names (:func:`metalora_core.models.detect_family`), never from the file name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import MetaLoRAError
from .models import detect_family, family_of
from .safeio import atomic_write_bytes, load_tensors
from .targets import resolve_targets


def _diffusers_files(folder: Path) -> list[Path]:
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        raise MetaLoRAError(
            f"{folder}: not a diffusers transformer folder (needs config.json and *.safetensors; "
            "a pipeline folder with a transformer/ subfolder works too)"
        )
    return files


def _header_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():
                    shapes[key] = tuple(fh.get_slice(key).get_shape())
        except (SafetensorError, OSError) as exc:
            raise MetaLoRAError(f"{file}: not a readable safetensors file ({exc})") from None
    return shapes


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def read_weight_dtype(path: str | os.PathLike) -> torch.dtype | None:
    """The dtype most of a checkpoint's weight matrices are stored in (headers only), or None."""
    path = Path(path)
    files = _diffusers_files(path) if path.is_dir() else [path]
    counts: dict[str, int] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():
                    piece = fh.get_slice(key)
                    if key.endswith("weight") and len(piece.get_shape()) == 2:
                        counts[piece.get_dtype()] = counts.get(piece.get_dtype(), 0) + 1
        except (SafetensorError, OSError) as exc:
            raise MetaLoRAError(f"{file}: not a readable safetensors file ({exc})") from None
    if not counts:
        return None
    return _SAFETENSORS_DTYPES.get(max(counts, key=counts.__getitem__))


def read_model_dims(path: str | os.PathLike):
    """Sizes (the family's dims) and layout (``bfl`` or ``diffusers``) of a checkpoint, reading headers only."""
    path = Path(path)
    if path.is_dir():
        shapes = _header_shapes(_diffusers_files(path))
    elif not path.is_file():
        raise MetaLoRAError(
            f"{path}: no such model checkpoint (a FLUX.1 or Qwen-Image .safetensors file, or a diffusers folder)"
        )
    else:
        shapes = _header_shapes([path])
    return detect_family(shapes, str(path)).dims_from_shapes(
        shapes, str(path)
    )  # a folder has diffusers names


def fused_shapes(dims) -> dict[str, tuple[int, int]]:
    """``{canonical target: (out, in)}`` for every adaptable layer of a model of these sizes."""
    return {t.name: (t.out_features, t.in_features) for t in resolve_targets(dims, "all_linear")}


def load_diffusers_model(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
):
    """Build the family's diffusers transformer (``FluxTransformer2DModel``, ``QwenImageTransformer2DModel``)
    from a diffusers folder or a single file, offline."""
    path = Path(path)
    dims, layout = read_model_dims(path)
    family = family_of(dims)
    model_class = family.diffusers_class()
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
        model = model_class.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
        return model.to(device), dims
    sd, _ = load_tensors(path)
    sd = family.to_diffusers(sd, layout, str(path))
    with torch.device("meta"):
        model = model_class(**family.diffusers_config(dims))
    missing = set(model.state_dict()) - set(sd)
    if missing:
        raise MetaLoRAError(f"{path}: key '{sorted(missing)[0]}' is missing ({len(missing)} missing)")
    model.load_state_dict(
        {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True
    )
    family.finish_meta_model(model, dims)
    return model, dims  # tensors were cast while loading: a later `.to(dtype)` would only make diffusers warn


def save_diffusers_config(folder: Path, dims) -> None:
    family = family_of(dims)
    config = {"_class_name": family.diffusers_class().__name__, **family.diffusers_config(dims)}
    config["axes_dims_rope"] = list(config["axes_dims_rope"])  # type: ignore[arg-type]
    text = json.dumps(config, indent=2)
    atomic_write_bytes(folder / "config.json", lambda tmp: Path(tmp).write_text(text))
