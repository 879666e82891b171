"""Which trainer a loaded ComfyUI MODEL gets: its base-model family, read from ComfyUI's own model class.

``comfy.model_base.Flux`` is FLUX.1 (:mod:`.backend`), ``comfy.model_base.QwenImage`` is Qwen-Image
(:mod:`.qwen_image`); each family's check then refuses the variants it cannot train (FLUX.2, Qwen-Image edit
models, ...) by name. Anything else is a clear error on the MODEL input naming both families.
"""

from __future__ import annotations

import comfy.model_base

from .backend import ComfyFluxBackend
from .base import ComfyBackend, unsupported_model
from .qwen_image import ComfyQwenImageBackend


def backend_class(model_patcher) -> type[ComfyBackend]:
    """The backend class of the family of ``model_patcher``'s model (not yet checked in detail)."""
    base = getattr(model_patcher, "model", None)
    if isinstance(base, comfy.model_base.Flux):
        return ComfyFluxBackend
    if isinstance(base, comfy.model_base.QwenImage):
        return ComfyQwenImageBackend
    raise unsupported_model(model_patcher)


def make_backend(model_patcher, memory_required: int = 0) -> ComfyBackend:
    """The in-graph trainer for this MODEL (a clone of its patcher; the MODEL itself is never changed)."""
    return backend_class(model_patcher)(model_patcher, memory_required)


def model_dims(model_patcher):
    """The family's sizes of a loaded MODEL (``FluxDims`` / ``QwenImageDims``), checked as for training."""
    cls = backend_class(model_patcher)
    return cls.dims_of(cls.diffusion_model_of(model_patcher))
