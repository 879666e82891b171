"""Stage 2: train one identity's Mid (LoM) and Up (LoU) from one photo, the LoMD frozen.

The objective is FLUX's own rectified flow (``x_t = (1 - t) x0 + t noise``, target ``noise - x0``) with
logit-normal timesteps moved by FLUX's resolution-dependent shift (see :mod:`.objective`). FLUX.1-dev is
guidance-distilled: its guidance embedder is fed ``guidance = 1.0`` during training (kohya sd-scripts'
and ai-toolkit's choice for FLUX.1-dev LoRAs): a real photo is a sample of the *unguided* distribution, and
training at a large guidance value would teach the adapter to undo the guidance the sampler later adds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import MetaLoRAError
from ..formats import IdentityAdapter, LoMD
from ..inject import heads_to_adapter, make_heads
from .loop import LoopOutcome, LoopSettings, run_loop
from .protocol import FluxBackend, Progress, TextConditioning


@dataclass
class PersonalizeConfig:
    """Stage-2 settings. Defaults: the paper's 375 steps; everything else is documented in the README."""

    steps: int = 375
    lr: float = 4e-4  # Mid and Up; Up starts at zero, so a small LR would waste most of 375 steps
    lr_mid: float | None = None  # own LR for Mid (LoM); None: ``lr``
    lr_up: float | None = None  # own LR for Up (LoU); None: ``lr``
    weight_decay: float = 0.01
    schedule: str = "constant"  # constant | linear | cosine | cosine_restarts
    warmup_steps: int = 20
    cycles: int = 1  # cosine_restarts only
    min_lr_ratio: float = 0.0  # linear / cosine end at lr * min_lr_ratio
    batch_size: int = 1
    max_grad_norm: float | None = 1.0
    bf16: bool = False  # bf16 autocast of the forward; adapter weights and optimizer stay float32
    gradient_checkpointing: bool = False
    seed: int = 0
    guidance: float | None = 1.0  # FLUX.1-dev's guidance embedder input during training (see module doc)
    timestep_shift: bool = True  # FLUX's resolution-dependent shift of the logit-normal timesteps
    rank_mid: int | None = None  # None: the LoMD's default Mid rank
    targets: list[str] | None = None  # canonical layer names; None: every layer the LoMD covers
    checkpoint_every: int = 0  # 0: no checkpoints
    checkpoint_path: str | None = None
    resume_from: str | None = None
    capture_step: bool = True  # on a GPU, replay the step as a CUDA graph (speed only; falls back by itself)
    extra: dict[str, object] = field(default_factory=dict)  # recorded in the adapter's metadata only

    def loop_settings(self) -> LoopSettings:
        names = {f.name for f in dataclasses.fields(LoopSettings)}
        kept = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        return LoopSettings(**kept, lr_by_suffix={".mid": self.lr_mid, ".up": self.lr_up})

    def settings(self) -> dict[str, object]:
        """Everything that shapes the result (what a resumed checkpoint must agree on)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}


@dataclass
class PersonalizeResult:
    adapter: IdentityAdapter
    losses: list[float]
    lrs: list[float]
    steps_done: int
    seconds: float
    notes: list[str] = field(default_factory=list)  # how the steps ran (e.g. captured as a CUDA graph)


def head_dtype(backend: FluxBackend) -> torch.dtype:
    """Adapter weights train in float32 (float64 if the model is float64, as the gradient checks run)."""
    return torch.promote_types(backend.dtype, torch.float32)


def personalize(
    backend: FluxBackend,
    lomd: LoMD,
    views: Sequence[torch.Tensor],
    cond: TextConditioning,
    config: PersonalizeConfig | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    weights: Sequence[torch.Tensor] | None = None,
) -> PersonalizeResult:
    """Train a fresh identity adapter on ``views`` (VAE latents ``(C, H, W)``) captioned by ``cond``.

    Raises :class:`~.protocol.TrainingCancelled` when ``should_cancel()`` turns true (checked before every
    step; nothing is written and the model is left as it was) and :class:`~.schedules.TrainingDiverged`
    on NaN/inf, whose ``result`` holds the last finite adapter.
    """
    config = config or PersonalizeConfig()
    settings = config.settings()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # Mid's random init: same seed, same adapter
        heads = make_heads(
            backend.dims,
            lomd,
            targets=config.targets,
            rank_mid=config.rank_mid,
            dtype=head_dtype(backend),
            device=backend.device,
        )
    if not len(heads):
        raise MetaLoRAError(f"LoMD {lomd.source} covers no layer: nothing to train")
    params = dict(heads.named_parameters())

    def make_result(outcome: LoopOutcome) -> PersonalizeResult:
        training = {
            **settings,
            **config.extra,
            "method": "metalora-stage2",
            "steps_done": outcome.steps_done,
            "final_loss": outcome.losses[-1] if outcome.losses else None,
        }
        adapter = heads_to_adapter(heads, lomd, backend.dims, training)
        return PersonalizeResult(
            adapter, outcome.losses, outcome.lrs, outcome.steps_done, outcome.seconds, outcome.notes
        )

    outcome = run_loop(
        backend,
        params,
        lambda: backend.adapters(heads),
        views,
        cond,
        config.loop_settings(),
        settings,
        on_progress,
        should_cancel,
        weights,
        make_result,
    )
    return make_result(outcome)


__all__ = ["PersonalizeConfig", "PersonalizeResult", "Progress", "personalize"]
