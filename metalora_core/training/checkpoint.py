"""Training checkpoints as safetensors (never pickle): trainable weights, optimizer moments, the scheduler
position, the sampling RNG and the loss history, so a resumed run continues bit-for-bit like one that never
stopped. Written atomically: an interrupted save leaves the previous checkpoint intact."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MetaLoRAError
from ..safeio import load_tensors, save_tensors

FORMAT_CHECKPOINT = "metalora.train_checkpoint"
PARAM_PREFIX, OPTIM_PREFIX, RNG_KEY = "param.", "optim.", "rng.generator"


@dataclass
class TrainState:
    """The live objects a checkpoint captures: trainable weights by name, optimizer, LR schedule, RNG."""

    params: Mapping[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator


def save_checkpoint(
    path: str | os.PathLike,
    state: TrainState,
    step: int,
    losses: list[float],
    settings: Mapping[str, object],
) -> Path:
    """Write everything needed to resume after ``step`` optimizer steps."""
    params, optimizer, scheduler, generator = state.params, state.optimizer, state.scheduler, state.generator
    tensors: dict[str, torch.Tensor] = {PARAM_PREFIX + n: p.detach() for n, p in params.items()}
    for name, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM_PREFIX}{name}.{key}"] = value.detach()
    tensors[RNG_KEY] = generator.get_state()
    meta = {
        "format": FORMAT_CHECKPOINT,
        "step": str(step),
        "scheduler_last_epoch": str(scheduler.last_epoch),
        "losses": json.dumps(losses),
        "settings": json.dumps(dict(settings), sort_keys=True, default=str),
    }
    return save_tensors(path, tensors, meta)


def load_checkpoint(
    path: str | os.PathLike,
    state: TrainState,
    settings: Mapping[str, object],
    ignore: tuple[str, ...] = ("steps", "checkpoint_every", "checkpoint_path", "resume_from", "capture_step"),
) -> tuple[int, list[float]]:
    """Restore a :func:`save_checkpoint` file into live objects; returns ``(step, losses)``.

    Refuses a checkpoint written with other settings (``ignore`` lists those that may change on resume,
    such as the total step count), naming the first setting that differs.
    """
    params, optimizer, scheduler, generator = state.params, state.optimizer, state.scheduler, state.generator
    tensors, meta = load_tensors(path)
    if meta.get("format") != FORMAT_CHECKPOINT:
        raise MetaLoRAError(f"{path}: not a Meta-LoRA training checkpoint (format '{meta.get('format')}')")
    saved = json.loads(meta["settings"])
    current = json.loads(json.dumps(dict(settings), sort_keys=True, default=str))
    for key in sorted(set(saved) | set(current)):
        if key not in ignore and saved.get(key) != current.get(key):
            raise MetaLoRAError(
                f"{path}: checkpoint was trained with {key}={saved.get(key)!r}, this run has "
                f"{current.get(key)!r}; resume with the same settings or start a new run"
            )
    for name, p in params.items():
        key = PARAM_PREFIX + name
        if key not in tensors or tensors[key].shape != p.shape:
            raise MetaLoRAError(f"{path}: parameter '{name}' is missing or has another shape")
        with torch.no_grad():
            p.copy_(tensors[key])
        state = {
            k[len(f"{OPTIM_PREFIX}{name}.") :]: v
            for k, v in tensors.items()
            if k.startswith(f"{OPTIM_PREFIX}{name}.")
        }
        if state:
            optimizer.state[p] = {k: _restore(optimizer, p, k, v) for k, v in state.items()}
    generator.set_state(tensors[RNG_KEY])
    scheduler.last_epoch = int(meta["scheduler_last_epoch"])
    for group, lr_lambda, base_lr in zip(optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs):
        group["lr"] = base_lr * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # type: ignore[attr-defined]
    return int(meta["step"]), [float(x) for x in json.loads(meta["losses"])]


def _restore(
    optimizer: torch.optim.Optimizer, p: torch.Tensor, key: str, value: torch.Tensor
) -> torch.Tensor:
    """An optimizer state tensor as the optimizer keeps it: moments beside the parameter; the step count
    on the CPU, or a float32 scalar beside the parameter for fused / capturable AdamW."""
    if key != "step":
        return value.to(p.device, p.dtype).clone()
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    return value.to(p.device, torch.float32).clone() if on_device else value.clone()
