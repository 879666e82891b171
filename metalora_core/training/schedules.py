"""Optimizer, learning-rate schedules and the non-finite guard, shared by personalization and meta-training.

Schedules are multipliers of the base learning rate: a linear warm-up from ``1 / (warmup + 1)`` to 1, then
``constant``, ``linear`` (to ``min_ratio``), ``cosine`` (to ``min_ratio``) or ``cosine_restarts`` (``cycles``
cosine decays, each restarting at 1). They are plain functions of the step, so a resumed run gets exactly
the learning rates an uninterrupted run gets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..errors import MetaLoRAError

SCHEDULES = ("constant", "linear", "cosine", "cosine_restarts")


def lr_multiplier(
    step: int,
    total: int,
    schedule: str = "constant",
    warmup: int = 0,
    cycles: int = 1,
    min_ratio: float = 0.0,
) -> float:
    """The multiplier of the base LR for optimizer step ``step`` (0-based) of ``total``."""
    if schedule not in SCHEDULES:
        raise MetaLoRAError(f"unknown LR schedule '{schedule}' (one of {', '.join(SCHEDULES)})")
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    phase = (progress * max(1, cycles)) % 1.0 if progress < 1.0 else 1.0
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * phase))


def capped_warmup(steps: int, warmup: int) -> tuple[int, str | None]:
    """The warm-up a run of ``steps`` can have: at most ``steps - 1``, so the last step trains at the set
    learning rate (a 20-step warm-up in a 10-step run would never reach it). Returns it and, when capped,
    a note saying so."""
    if steps < 1 or warmup < steps:
        return warmup, None
    capped = steps - 1
    return capped, (
        f"warm-up capped at {capped} steps (asked {warmup}) so that the last of the {steps} steps trains at the "
        "set learning rate"
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    total: int,
    schedule: str = "constant",
    warmup: int = 0,
    cycles: int = 1,
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    lr_multiplier(0, total, schedule, warmup, cycles, min_ratio)  # validate the name up front
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total, schedule, warmup, cycles, min_ratio)
    )


def param_groups(
    named: Iterable[tuple[str, torch.nn.Parameter]],
    lr: float,
    lr_by_suffix: dict[str, float | None] | None = None,
    weight_decay: float = 0.0,
) -> list[dict[str, object]]:
    """AdamW groups: parameters whose name ends with a key of ``lr_by_suffix`` get that LR (if not None).

    For Meta-LoRA heads ``{"mid": lr_mid, "up": lr_up}`` gives Mid and Up their own learning rates.
    Group order is fixed (by suffix, then the rest), so optimizer state lines up across runs.
    """
    lr_by_suffix = {k: v for k, v in (lr_by_suffix or {}).items() if v is not None}
    buckets: dict[str, list[torch.nn.Parameter]] = {k: [] for k in lr_by_suffix}
    rest: list[torch.nn.Parameter] = []
    for name, p in named:
        if not p.requires_grad:
            continue
        key = next((k for k in lr_by_suffix if name.endswith(k)), None)
        (buckets[key] if key is not None else rest).append(p)
    groups: list[dict[str, object]] = [
        {"params": ps, "lr": lr_by_suffix[k], "weight_decay": weight_decay, "name": k}
        for k, ps in buckets.items()
        if ps
    ]
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "default"})
    if not groups:
        raise MetaLoRAError("nothing to train: no parameter requires a gradient")
    return groups


def make_adamw(
    groups: list[dict[str, object]],
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW; ``fused``: one kernel per parameter group, reading a ``found_inf`` flag on the device.

    Both are deterministic (the same seed gives bit-identical weights). The fused one is what a training
    step on a GPU wants (no per-parameter kernels, no host decision on non-finite steps, CUDA-graph
    capturable); the per-parameter one stays for meta-training, whose head state is paged through the CPU.
    """
    if fused:
        return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=True)
    return torch.optim.AdamW(groups, betas=betas, eps=eps, foreach=False)


class TrainingDiverged(MetaLoRAError):
    """The loss or the gradients became NaN/inf. ``result`` holds the last finite weights (if the loop has one)."""

    def __init__(self, message: str, result: object | None = None) -> None:
        super().__init__(message)
        self.result = result


__all__ = [
    "SCHEDULES",
    "TrainingDiverged",
    "capped_warmup",
    "lr_multiplier",
    "make_adamw",
    "make_scheduler",
    "param_groups",
]
