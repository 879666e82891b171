"""Adapter targets of any supported base model: the family-blind entry points the rest of the library uses.

Each function asks the family of the model's sizes (:func:`metalora_core.models.family_of`), so FLUX.1 and
Qwen-Image share every caller. The FLUX-only tools (BFL <-> diffusers conversion, its layer tuples) are
re-exported from :mod:`metalora_core.models.flux` for the code that is FLUX's by nature.
"""

from __future__ import annotations

from collections.abc import Iterable

from .models import FAMILIES, ModelFamily, Target, family_named, family_of
from .models.family import LoraPlace, kohya_name, split_layer_name
from .models.flux import (  # noqa: F401  (FLUX's own names, re-exported)
    DEFAULT_PRESET,
    DOUBLE_ATTN,
    DOUBLE_MLP,
    DOUBLE_MOD,
    PRESET_HELP,
    PRESETS,
    SINGLE_CORE,
    SINGLE_MOD,
    FluxDims,
    bfl_to_diffusers,
    diffusers_to_bfl,
    dims_from_bfl,
    dims_from_diffusers,
    strip_bfl_prefix,
)
from .models.qwen_image import QwenImageDims  # noqa: F401


def resolve_targets(dims, preset: str | Iterable[str] = DEFAULT_PRESET) -> list[Target]:
    """The canonical targets of a preset (``attn``, ``attn_mlp``, ``all_linear``) or of explicit names."""
    return family_of(dims).resolve_targets(dims, preset)


def layer_shape(dims, name: str) -> tuple[int, int]:
    """The (fused) ``(out, in)`` shape of one canonical layer."""
    return family_of(dims).layer_shape(dims, name)


def diffusers_pieces(name: str, dims) -> list[tuple[str, slice | None]]:
    """The diffusers modules a canonical target becomes, each with its row slice (None: the whole weight)."""
    return family_of(dims).diffusers_pieces(name, dims)


def diffusers_config_for(dims) -> dict[str, object]:
    """The diffusers transformer config that holds a model of these sizes."""
    return family_of(dims).diffusers_config(dims)


def _placed(prefix: str, family: ModelFamily, layout: str) -> LoraPlace | None:
    hit = family.place_lora_prefix(prefix)
    return hit if hit is not None and hit.layout == layout else None


def canonical_from_kohya(prefix: str, dims=None, family: str | None = None) -> str | None:
    """Inverse of :func:`kohya_name` (underscores are ambiguous: matched against the family's layer set)."""
    hit = _placed(prefix, family_of(dims) if dims is not None else family_named(family), "kohya")
    return hit.name if hit else None


def canonical_from_diffusers(module: str, family: str | None = None) -> tuple[str, int] | None:
    """(canonical name, piece index) of a diffusers module name."""
    hit = _placed(module, family_named(family), "diffusers")
    return (hit.name, hit.piece) if hit else None


def canonical_from_kohya_diffusers(prefix: str, family: str | None = None) -> tuple[str, int] | None:
    """kohya-style names over diffusers modules (``lora_transformer_...``): (canonical name, piece index)."""
    hit = _placed(prefix, family_named(family), "kohya-diffusers")
    return (hit.name, hit.piece) if hit else None


def presets_help() -> str:
    """One line per preset saying what it covers in each family (the names are the same in all)."""
    return "; ".join(
        f"{name}: " + " / ".join(f"{f.label}: {f.presets[name]}" for f in FAMILIES.values())
        for name in PRESET_HELP
    )


__all__ = [
    "DEFAULT_PRESET",
    "FAMILIES",
    "PRESETS",
    "PRESET_HELP",
    "FluxDims",
    "QwenImageDims",
    "Target",
    "canonical_from_diffusers",
    "canonical_from_kohya",
    "canonical_from_kohya_diffusers",
    "diffusers_config_for",
    "diffusers_pieces",
    "kohya_name",
    "layer_shape",
    "presets_help",
    "resolve_targets",
    "split_layer_name",
]
