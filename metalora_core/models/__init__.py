"""Base-model families behind one seam: FLUX.1 (:mod:`.flux`) and Qwen-Image (:mod:`.qwen_image`).

Everything family-specific is asked of the family of a model's sizes (:func:`family_of`) or of a file's
tensors (:func:`detect_family`); see :mod:`.family` for what a family defines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from ..errors import MetaLoRAError
from .family import LoraPlace, ModelFamily, Target
from .flux import FLUX
from .qwen_image import QWEN_IMAGE

FAMILIES: dict[str, ModelFamily] = {FLUX.name: FLUX, QWEN_IMAGE.name: QWEN_IMAGE}  # type: ignore[dict-item]


def family_named(name: str | None) -> ModelFamily:
    """The family stored as ``base_arch`` (files written before Qwen-Image existed say ``flux`` or nothing)."""
    family = FAMILIES.get(name or FLUX.name)
    if family is None:
        raise MetaLoRAError(f"unknown base model family '{name}' (known: {', '.join(FAMILIES)})")
    return family


def family_of(dims: object) -> ModelFamily:
    """The family a model's sizes belong to (each family's dims class names it)."""
    return family_named(getattr(dims, "family", None))


def family_of_targets(names: Iterable[str]) -> ModelFamily:
    """The family whose canonical layer names these are (files written before Qwen-Image say no family)."""
    for name in names:
        if QWEN_IMAGE.place_lora_prefix(name) is not None:
            return QWEN_IMAGE  # type: ignore[return-value]
        if name.startswith(("double_blocks.", "single_blocks.")):
            return FLUX  # type: ignore[return-value]
    return FLUX  # type: ignore[return-value]


def family_placing(items: Iterable[str], places: Callable[[str, ModelFamily], bool]) -> ModelFamily:
    """The family that places an item (a LoRA or LoMD key) FLUX.1's layers cannot; FLUX.1 when none does
    (names valid in several families, such as plain attention keys, stay FLUX.1's as before Qwen-Image)."""
    items = list(items)
    for family in FAMILIES.values():
        if family is not FLUX and any(places(i, family) and not places(i, FLUX) for i in items):
            return family
    return FLUX  # type: ignore[return-value]


def detect_family(shapes: Mapping[str, object], source: str = "model") -> ModelFamily:
    """The family whose checkpoint layout these tensor names are (most specific first)."""
    for family in (QWEN_IMAGE, FLUX):
        if family.owns(shapes):
            return family  # type: ignore[return-value]
    raise MetaLoRAError(
        f"{source}: neither a FLUX.1 nor a Qwen-Image transformer (no 'img_in'/'x_embedder' weight); "
        "pass the diffusion model file, not a text encoder or VAE"
    )


__all__ = [
    "FAMILIES",
    "LoraPlace",
    "ModelFamily",
    "Target",
    "detect_family",
    "family_named",
    "family_of",
    "family_of_targets",
    "family_placing",
]
