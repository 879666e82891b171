"""Several adapters on one model in bypass mode, each switchable between denoiser passes at no cost.

ComfyUI's bypass mode (``comfy.weight_adapter.bypass``) computes ``f(x) + h(x)`` per layer instead of
patching weights; its hooks hold one adapter per layer. Composition needs every adapter of a layer in one
forward, each with its own live multiplier that the sampling wrapper sets before each pass, so this module
builds one :class:`MultiBypassHook` per layer and hands them to ComfyUI as a ``PatcherInjection``
(``ModelPatcher.set_injections``): ComfyUI injects on load and ejects on unload, so nothing outlives the
MODEL that carries it and base weights are never touched (fp8 / GGUF / offloaded weights stay as they are).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from comfy import model_management
from comfy.patcher_extension import PatcherInjection
from comfy.weight_adapter import WeightAdapterBase

from ...metalora_core.errors import MetaLoRAError

Offset = tuple[int, int, int] | None  # ComfyUI's (dim, start, size) row slice of a fused weight


@dataclass
class PassState:
    """The multiplier of each adapter in the pass being run (all 0 outside a sampler's wrapper)."""

    multipliers: list[float] = field(default_factory=list)

    def set(self, values: Sequence[float]) -> None:
        self.multipliers[:] = [float(v) for v in values]

    def clear(self) -> None:
        self.multipliers[:] = [0.0] * len(self.multipliers)


def _module_name(weight_key: str) -> str:
    return weight_key[: -len(".weight")] if weight_key.endswith(".weight") else weight_key


def split_patch_key(key) -> tuple[str, Offset]:
    """ComfyUI patch keys are ``"x.weight"`` or ``("x.weight", (dim, start, size)[, function])``."""
    if isinstance(key, str):
        return key, None
    if len(key) > 2 and key[2] is not None:
        raise MetaLoRAError(
            f"layer {key[0]}: a LoRA patch with a transform function cannot run in bypass mode"
        )
    return key[0], tuple(key[1]) if key[1] is not None else None


class _LayerDispatch:
    """The one forward wrapper a module has while any composition hook is injected into it.

    Hooks of several compositions on the same layer (stacked Compose nodes) register here instead of
    wrapping each other, so they can be ejected in any order and the module gets its own forward back."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.hooks: list[MultiBypassHook] = []
        self.had_own_forward = "forward" in vars(module)
        self.original_forward = module.forward
        module.forward = self.forward

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.original_forward(x, *args, **kwargs)
        for hook in self.hooks:
            out = hook.add_to(x, out)
        return out

    def restore(self) -> None:
        if self.had_own_forward:
            self.module.forward = self.original_forward
        else:
            del self.module.forward  # back to the class's forward, exactly as before


_DISPATCH: weakref.WeakKeyDictionary[torch.nn.Module, _LayerDispatch] = weakref.WeakKeyDictionary()


class MultiBypassHook:
    """One composition's adapters on one layer: adds ``sum_i m_i * h_i(x)`` over the adapters whose
    multiplier ``m_i`` in the current pass is non-zero."""

    def __init__(self, module: torch.nn.Module, state: PassState) -> None:
        self.module = module
        self.state = state
        self.entries: list[tuple[int, WeightAdapterBase, Offset]] = []
        self.injected = False

    def add(self, index: int, adapter: WeightAdapterBase, offset: Offset) -> None:
        if offset is not None and offset[0] != 0:
            raise MetaLoRAError(
                f"a bypass patch slices dimension {offset[0]}; only output rows (0) are supported"
            )
        adapter.is_conv, adapter.conv_dim, adapter.kw_dict = False, 0, {}  # what ComfyUI's hook sets
        self.entries.append((index, adapter, offset))

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        for index, adapter, offset in self.entries:
            m = self.state.multipliers[index]
            if m == 0.0:
                continue
            adapter.multiplier = m
            h = adapter.h(x, out).to(out.dtype)
            if offset is None:
                out = out + h
            else:
                _, start, size = offset
                out = torch.cat(
                    [out[..., :start], out[..., start : start + size] + h, out[..., start + size :]], -1
                )
        return out

    def inject(self) -> None:
        if self.injected:
            return
        device = model_management.get_torch_device()
        for _, adapter, _ in self.entries:  # once per load, not per forward (as ComfyUI's own bypass does)
            adapter.weights = tuple(w.to(device) if torch.is_tensor(w) else w for w in adapter.weights)
        dispatch = _DISPATCH.get(self.module)
        if dispatch is None:
            dispatch = _DISPATCH[self.module] = _LayerDispatch(self.module)
        dispatch.hooks.append(self)
        self.injected = True

    def eject(self) -> None:
        if not self.injected:
            return
        self.injected = False
        dispatch = _DISPATCH.get(self.module)
        if dispatch is None or self not in dispatch.hooks:
            return
        dispatch.hooks.remove(self)
        if not dispatch.hooks:
            dispatch.restore()
            _DISPATCH.pop(self.module, None)


def bypass_injection(
    model: torch.nn.Module, adapters: Sequence[Mapping], state: PassState, names: Sequence[str]
) -> list[PatcherInjection]:
    """One injection holding a hook per layer any adapter touches. ``adapters[i]`` is a ComfyUI patch dict
    (``{key: WeightAdapterBase}``, keys as ``add_patches`` takes them); full-weight patches are refused."""
    state.multipliers[:] = [0.0] * len(adapters)
    hooks: dict[str, MultiBypassHook] = {}
    for index, patches in enumerate(adapters):
        for key, patch in patches.items():
            weight_key, offset = split_patch_key(key)
            if not isinstance(patch, WeightAdapterBase) or not hasattr(patch, "h"):
                raise MetaLoRAError(
                    f"{names[index]}: layer {weight_key} is a full weight difference, not a low-rank "
                    "adapter; switch and composite run adapters in bypass mode. Use Compose (Merge) for it."
                )
            if (
                getattr(patch, "weights", None) is not None
                and len(patch.weights) > 4
                and patch.weights[4] is not None
            ):
                raise MetaLoRAError(f"{names[index]}: layer {weight_key} is DoRA; use Compose (Merge) for it")
            name = _module_name(weight_key)
            if name not in hooks:
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    raise MetaLoRAError(f"{names[index]}: the model has no layer {name}") from None
                hooks[name] = MultiBypassHook(module, state)
            hooks[name].add(index, patch, offset)
    hook_list = list(hooks.values())

    def inject_all(_patcher) -> None:
        for hook in hook_list:
            hook.inject()

    def eject_all(_patcher) -> None:
        for hook in reversed(hook_list):
            hook.eject()

    return [PatcherInjection(inject=inject_all, eject=eject_all)]
