"""The plain-LoRA baseline on the very same loop: peft LoRA of a chosen rank on the same target layers,
same views, timesteps, noise, optimizer and schedule for the same seed, so Meta-LoRA and LoRA compare
step for step (the paper's comparison: ~375 steps for Meta-LoRA vs 625+ for LoRA).

Only the diffusers backend is supported (peft wraps diffusers' ``nn.Linear`` modules). The result is a
diffusers/peft LoRA (``transformer.<module>.lora_A/B.weight``, the ``alpha / rank`` scale baked into B).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MetaLoRAError
from ..inject import _parent
from ..targets import DEFAULT_PRESET, diffusers_pieces, resolve_targets
from .diffusers_backend import DiffusersBackend
from .loop import run_loop
from .personalize import PersonalizeConfig
from .protocol import Progress, TextConditioning

ADAPTER = "baseline"


@dataclass
class LoraBaselineResult:
    lora: dict[str, torch.Tensor]  # diffusers / peft names, scale baked into lora_B
    losses: list[float]
    lrs: list[float]
    steps_done: int
    seconds: float


def diffusers_modules(backend: DiffusersBackend, targets: Sequence[str] | str = DEFAULT_PRESET) -> list[str]:
    """The diffusers module names behind canonical targets (split pieces each get their own LoRA)."""
    names = [t.name for t in resolve_targets(backend.dims, targets)] if isinstance(targets, str) else targets
    return [module for name in names for module, _ in diffusers_pieces(name, backend.dims)]


@contextmanager
def peft_lora(model: nn.Module, modules: list[str], rank: int, alpha: float, seed: int) -> Iterator[dict]:
    """peft LoRA layers on ``modules`` while open (float32, B = 0); the plain model again on exit."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    pattern = "^(" + "|".join(re.escape(m) for m in modules) + ")$"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(
            LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern), model, adapter_name=ADAPTER
        )
    params = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            params[name] = p
    try:
        yield params
    finally:
        for name, module in list(model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent, child = _parent(model, name)
                setattr(parent, child, module.get_base_layer())
        if "peft_config" in vars(model):  # peft's bookkeeping on the model goes too
            del model.peft_config


def train_lora_baseline(
    backend: DiffusersBackend,
    views: Sequence[torch.Tensor],
    cond: TextConditioning,
    config: PersonalizeConfig | None = None,
    rank: int = 16,
    alpha: float | None = None,
    targets: Sequence[str] | str = DEFAULT_PRESET,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    weights: Sequence[torch.Tensor] | None = None,
) -> LoraBaselineResult:
    """Train a plain rank-``rank`` LoRA with the loop and settings :func:`personalize` uses."""
    if not isinstance(backend, DiffusersBackend):
        raise MetaLoRAError("the LoRA baseline needs the diffusers backend (peft wraps diffusers modules)")
    config = config or PersonalizeConfig()
    alpha = float(alpha if alpha is not None else rank)
    modules = diffusers_modules(backend, targets)
    settings = {**config.settings(), "method": "lora-baseline", "rank": rank, "alpha": alpha}
    loop = config.loop_settings()
    loop.lr_by_suffix = {}
    # peft creates its parameters on injection, so the LoRA is attached before the loop sees them
    with peft_lora(backend.model, modules, rank, alpha, config.seed) as params:
        outcome = run_loop(
            backend, params, nullcontext, views, cond, loop, settings, on_progress, should_cancel, weights
        )
        lora = export_peft(params, alpha / rank)
    return LoraBaselineResult(lora, outcome.losses, outcome.lrs, outcome.steps_done, outcome.seconds)


def export_peft(params: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """peft parameter names -> diffusers LoRA names, with ``scale`` baked into ``lora_B``."""
    out = {}
    for name, p in params.items():
        key = "transformer." + name.replace(f".{ADAPTER}.weight", ".weight")
        value = p.detach().float().cpu().clone()
        out[key] = value * scale if ".lora_B." in key else value
    return out
