"""A MODEL carrying several adapters (identities and ordinary LoRA files) under one composition strategy.

merge: ComfyUI weight patches (``add_patches``), exactly what chaining Apply / LoraLoader does.
switch / composite: every adapter in bypass mode (:mod:`.compose_bypass`) plus an ``APPLY_MODEL`` wrapper
(``ModelPatcher.add_wrapper_with_key``) that, at each denoiser call, asks :func:`metalora_core.compose.plan`
which adapters run in which pass, sets their multipliers and combines the passes' predictions. Both ride on
a clone, so the incoming MODEL never changes and any stock sampler can use the result.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import comfy.lora
import comfy.lora_convert
import comfy.utils
from comfy import model_management
from comfy.patcher_extension import WrappersMP

from ...metalora_core.compose import Composition, combine, plan, step_index
from ...metalora_core.errors import MetaLoRAError
from ...metalora_core.formats import IdentityAdapter, LoMD
from .compose_bypass import PassState, bypass_injection
from .model_shapes import model_target_shapes
from .patch_plan import check_fits, patch_tensors
from .weight_adapter import MetaLoRAWeightAdapter


@dataclass(frozen=True, repr=False)
class AdapterSpec:
    """One entry of an adapter list: an identity (lomd + identity) or a LoRA file, with its numbers."""

    label: str
    strength: float
    weight: float = 1.0
    lomd: LoMD | None = None
    identity: IdentityAdapter | None = None
    lora_path: str | None = None

    def __repr__(self) -> str:  # ComfyUI prints inputs in error reports: never the tensors
        return f"{self.label} (strength {self.strength}, weight {self.weight})"


def identity_patches(model, spec: AdapterSpec) -> dict:
    check_fits(
        spec.lomd, spec.identity, model_target_shapes(model), model_name=f"the MODEL (for {spec.label})"
    )
    return {
        key: MetaLoRAWeightAdapter({key}, w) for key, w in patch_tensors(spec.lomd, spec.identity).items()
    }


def lora_patches(model, spec: AdapterSpec) -> dict:
    """ComfyUI's own LoRA loading (as LoraLoader): every naming ComfyUI knows (kohya, diffusers, ...)."""
    lora = comfy.utils.load_torch_file(spec.lora_path, safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map)
    if not patches:
        raise MetaLoRAError(
            f"{spec.label}: none of its {len(lora)} tensors matches a layer of this MODEL "
            "(a LoRA for another base model?)"
        )
    return patches


def adapter_patches(model, spec: AdapterSpec) -> dict:
    return identity_patches(model, spec) if spec.identity is not None else lora_patches(model, spec)


def composition_of(strategy: str, specs: list[AdapterSpec], every: int = 1) -> Composition:
    return Composition(
        strategy,
        tuple(s.strength for s in specs),
        tuple(s.weight for s in specs),
        every,
        tuple(s.label for s in specs),
    )


def merge(model, specs: list[AdapterSpec]):
    """A clone with every adapter weight-patched at its strength: ``W + sum_i s_i dW_i``."""
    composition_of("merge", specs)  # validates
    patched = model.clone()
    for spec in specs:
        patches = adapter_patches(model, spec)
        added = set(patched.add_patches(patches, strength_patch=spec.strength))
        missing = [k for k in patches if k not in added]
        if missing:
            raise MetaLoRAError(f"{spec.label}: ComfyUI refused the weight patch for {missing[0]}")
    return patched


def sampling_wrapper(composition: Composition, state: PassState):
    """The ``APPLY_MODEL`` wrapper: one denoiser call per planned pass, predictions combined."""

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        sigmas = transformer_options.get("sample_sigmas")
        step = step_index(sigmas, float(t.flatten()[0])) if sigmas is not None else 0
        predictions, shares = [], []
        try:
            for multipliers, share in plan(composition, step):
                model_management.throw_exception_if_processing_interrupted()
                state.set(multipliers)
                predictions.append(
                    executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
                )
                shares.append(share)
        finally:
            state.clear()  # outside a sampler the MODEL is the base model
        return combine(predictions, shares)

    return wrapper


def bypass_compose(model, specs: list[AdapterSpec], strategy: str, every: int = 1):
    """A clone running ``specs`` in bypass mode under ``strategy`` (switch or composite)."""
    composition = composition_of(strategy, specs, every)
    patched = model.clone()
    state = PassState()
    injections = bypass_injection(
        patched.model, [adapter_patches(model, s) for s in specs], state, [s.label for s in specs]
    )
    key = f"metalora_compose_{uuid.uuid4().hex[:12]}"  # stacked compositions do not replace each other
    patched.set_injections(key, injections)
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, key, sampling_wrapper(composition, state))
    return patched


def compose(model, specs: list[AdapterSpec], strategy: str, every: int = 1):
    if not specs:
        raise MetaLoRAError("the adapter list is empty: connect an 'Adapter: ...' node")
    if strategy == "merge":
        return merge(model, specs)
    return bypass_compose(model, specs, strategy, every)
