"""The single-subject training loop shared by Meta-LoRA personalization and the plain-LoRA baseline.

It only sees a :class:`FluxBackend`, named trainable parameters and a context manager that puts them into
the forward, so Meta-LoRA (bypass heads) and peft LoRA run the very same steps: same views, timesteps and
noise for the same seed, which is what a step-for-step comparison needs.

Every random draw (view choice, timestep, noise) comes from one CPU ``torch.Generator`` seeded from the
config and saved in checkpoints, so a resumed run reproduces an uninterrupted one bit for bit. The draws
are made ahead of the steps (:mod:`.draws`) and the step itself never waits for the device (:mod:`.step`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from ..errors import MetaLoRAError
from ..models import family_of
from .checkpoint import TrainState, load_checkpoint, save_checkpoint
from .draws import StepDraws
from .protocol import FluxBackend, Progress, TextConditioning, TrainingCancelled
from .schedules import TrainingDiverged, capped_warmup, make_adamw, make_scheduler, param_groups
from .step import CapturedStep, StepLog, TrainStep


@dataclass
class LoopSettings:
    """The knobs of :func:`run_loop` (a subset of ``PersonalizeConfig``; see its docs for the defaults)."""

    steps: int
    lr: float
    lr_by_suffix: dict[str, float | None] = field(default_factory=dict)
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    cycles: int = 1
    min_lr_ratio: float = 0.0
    batch_size: int = 1
    max_grad_norm: float | None = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    guidance: float | None = 1.0
    timestep_shift: bool = True
    checkpoint_every: int = 0
    checkpoint_path: str | None = None
    resume_from: str | None = None
    capture_step: bool = True  # replay the step as a CUDA graph where possible (speed only: same result)


@dataclass
class LoopOutcome:
    losses: list[float]
    lrs: list[float]
    steps_done: int
    seconds: float
    notes: list[str] = field(default_factory=list)  # how the steps ran (CUDA graph, or why not)


def stack_views(
    views: Sequence[torch.Tensor], weights: Sequence[torch.Tensor] | None, device, dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Views ``(C, H, W)`` -> ``(N, C, H, W)``; weights ``(1, H, W)`` -> ``(N, 1, H, W)``, checked."""
    if not views:
        raise MetaLoRAError("no training views: give at least one encoded image")
    shapes = {tuple(v.shape) for v in views}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise MetaLoRAError(f"views must all be latents of one shape (C, H, W), got {sorted(shapes)}")
    x = torch.stack([v.detach() for v in views]).to(device, dtype)
    if weights is None:
        return x, None
    if len(weights) != len(views):
        raise MetaLoRAError(f"{len(weights)} loss weights for {len(views)} views: give one mask per view")
    w = torch.stack([m.detach() for m in weights]).to(device, torch.float32)
    if w.shape[1] != 1 or w.shape[2:] != x.shape[2:] or bool((w < 0).any()):
        raise MetaLoRAError(
            f"loss weights must be non-negative masks (1, {x.shape[2]}, {x.shape[3]}), got {tuple(w.shape[1:])}"
        )
    return x, w


def run_loop(
    backend: FluxBackend,
    params: Mapping[str, torch.nn.Parameter],
    attach: Callable[[], AbstractContextManager[object]],
    views: Sequence[torch.Tensor],
    cond: TextConditioning,
    settings: LoopSettings,
    describe: Mapping[str, object],
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    weights: Sequence[torch.Tensor] | None = None,
    make_result: Callable[[LoopOutcome], object] | None = None,
) -> LoopOutcome:
    """Train ``params`` for ``settings.steps`` optimizer steps of the rectified-flow objective.

    ``describe`` is what a checkpoint must agree on to be resumed (the full settings). On NaN/inf no update
    is made from that step on and :class:`TrainingDiverged` is raised with ``make_result`` of the last finite
    state. Progress (loss, learning rate) is reported one step late: the host reads a step's loss while the
    device runs the next one (:mod:`.step`).
    """
    if settings.steps < 1:
        raise MetaLoRAError(f"steps must be >= 1, got {settings.steps}")
    if settings.checkpoint_every and not settings.checkpoint_path:
        raise MetaLoRAError("checkpoint_every needs a checkpoint_path to write to")
    x0_all, w_all = stack_views(views, weights, backend.device, torch.float32)
    cond = cond.to(backend.device, backend.dtype)  # once, not a host copy per step
    generator = torch.Generator().manual_seed(settings.seed)
    named = list(params.items())
    groups = param_groups(named, settings.lr, settings.lr_by_suffix, settings.weight_decay)
    optimizer = make_adamw(groups, fused=True)
    warmup, warmup_note = capped_warmup(settings.steps, settings.warmup_steps)
    scheduler = make_scheduler(
        optimizer,
        settings.steps,
        settings.schedule,
        warmup,
        settings.cycles,
        settings.min_lr_ratio,
    )
    losses: list[float] = []
    start = 0
    if settings.resume_from:
        start, losses = load_checkpoint(
            settings.resume_from, TrainState(params, optimizer, scheduler, generator), describe
        )
    base_lr, lr_at = scheduler.base_lrs[-1], scheduler.lr_lambdas[-1]
    lrs: list[float] = [base_lr * lr_at(i) for i in range(start)]
    draws = StepDraws(
        generator,
        x0_all.shape[0],
        settings.batch_size,
        tuple(x0_all.shape[1:]),
        settings.timestep_shift,
        backend.device,
        start,
        settings.steps,
        shift_range=family_of(backend.dims).shift_range,
    )
    step_fn = TrainStep(
        backend,
        [p for _, p in named],
        optimizer,
        cond,
        settings.max_grad_norm,
        settings.guidance,
        settings.bf16,
    )
    run_step = _stepper(step_fn, backend, settings)
    log = StepLog(backend.device)
    begun = time.perf_counter()

    def outcome(done: int) -> LoopOutcome:
        notes = ([warmup_note] if warmup_note else []) + _notes(run_step)
        return LoopOutcome(list(losses), list(lrs[: len(losses)]), done, time.perf_counter() - begun, notes)

    def absorb(entries: list[tuple[int, float, float]]) -> None:
        """Host side of finished steps: the non-finite guard, the loss list, progress."""
        for step, loss, norm in entries:
            if not (math.isfinite(loss) and math.isfinite(norm)):
                what = (
                    f"the loss became {loss}"
                    if not math.isfinite(loss)
                    else f"the gradient norm became {norm}"
                )
                _diverged(f"{what} at step {step + 1}", lrs[step], outcome(step), make_result)
            losses.append(loss)
            if on_progress is not None:
                done = step + 1
                elapsed = time.perf_counter() - begun
                eta = elapsed / (done - start) * (settings.steps - done)
                on_progress(Progress(done, settings.steps, loss, lrs[step], eta))

    if settings.gradient_checkpointing:
        backend.set_gradient_checkpointing(True)
    try:
        with attach():
            for step in range(start, settings.steps):
                if should_cancel is not None and should_cancel():
                    raise TrainingCancelled(f"training cancelled at step {step} of {settings.steps}")
                index, t, noise = draws.take(step)
                lrs.append(base_lr * lr_at(step))
                loss, norm = run_step(
                    x0_all.index_select(0, index),
                    t,
                    noise,
                    None if w_all is None else w_all.index_select(0, index),
                )
                log.record(step, loss, norm)
                scheduler.step()
                absorb(log.ready())
                done = step + 1
                if settings.checkpoint_every and (
                    done % settings.checkpoint_every == 0 or done == settings.steps
                ):
                    absorb(log.ready(keep_newest=False))  # never checkpoint past a non-finite step
                    state = TrainState(params, optimizer, scheduler, _generator(draws.state_before(done)))
                    save_checkpoint(settings.checkpoint_path, state, done, losses, describe)  # type: ignore[arg-type]
            absorb(log.ready(keep_newest=False))
    finally:
        if settings.gradient_checkpointing:
            backend.set_gradient_checkpointing(False)
    return outcome(settings.steps)


def _stepper(step_fn: TrainStep, backend: FluxBackend, settings: LoopSettings):
    """The eager step, or its CUDA-graph capture where the device and the backend allow one."""
    if settings.capture_step and backend.device.type == "cuda" and getattr(backend, "capturable", False):
        return CapturedStep(step_fn)

    def eager(*inputs):
        out = step_fn(*inputs)
        step_fn.release()
        return out

    return eager


def _notes(run_step) -> list[str]:
    if isinstance(run_step, CapturedStep):
        if run_step.failed:
            return [f"CUDA-graph capture failed, trained eagerly: {run_step.failed}"]
        return ["training step captured as a CUDA graph"] if run_step.graph is not None else []
    return []


def _generator(state: torch.Tensor) -> torch.Generator:
    g = torch.Generator()
    g.set_state(state)
    return g


def _diverged(what: str, lr: float, last: LoopOutcome, make_result) -> None:
    kept = f"the weights after step {last.steps_done} (the last finite ones) are kept"
    raise TrainingDiverged(
        f"training stopped: {what} (lr {lr:.3g}); {kept}. Lower the learning rate, keep gradient clipping "
        "on, or train in float32 instead of bf16",
        make_result(last) if make_result is not None else None,
    )
