"""Stage 1: meta-train the shared Down (LoMD) over many identities, each with its own Mid/Up head.

Every step takes one bucket batch of photos (:mod:`.sampler`); each photo trains the shared Down through
its identity's head with the personalization trainer's rectified-flow objective (:func:`flow_loss`,
FLUX-shifted logit-normal timesteps, guidance input 1.0). The Down has one AdamW with the trainer's
warm-up schedule; the heads live in a CPU bank and only the batch's heads are paged in (:mod:`.bank`).

Randomness is per photo slot: the timestep and noise of position ``p`` of step ``s`` come from a generator
seeded by ``(seed, s, p)``, so the result does not depend on how many processes share the batch; with
``torchrun``/``accelerate`` each process trains the photos of the identities it owns and the Down's
gradients are summed (:mod:`.distributed`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..adapter import AdapterShape
from ..dev.random_assets import orthonormal_downs
from ..errors import MetaLoRAError
from ..formats import PROVENANCE_KEY, SOURCE_KEY, LoMD, check_lomd_fits, load_lomd
from ..model_files import fused_shapes
from ..models import family_of
from ..targets import DEFAULT_PRESET, resolve_targets
from ..training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from ..training.loop import LoopSettings
from ..training.objective import flow_loss, sample_timesteps
from ..training.protocol import FluxBackend, Progress
from ..training.schedules import TrainingDiverged, capped_warmup, make_adamw, make_scheduler, param_groups
from .bank import BankLayout, HeadBank
from .dataset import IdentitySet
from .distributed import DistContext, all_reduce_grads, all_reduce_sum, gather_to_main
from .prepare import Prepared
from .sampler import BucketPlan, BucketSampler

DOWN, BANK = "down.", "bank."


@dataclass
class MetaConfig(LoopSettings):
    """Stage-1 settings: the personalization loop's knobs plus the heads' (README "Meta-training a LoMD"
    explains the defaults). ``batch_size`` is photos per step, drawn from one bucket: up to that many
    identities (``--identities-per-batch``)."""

    steps: int = 2000
    lr: float = 1e-4  # the shared Down
    batch_size: int = 4
    warmup_steps: int = 100
    lr_heads: float = 4e-4  # Mid/Up heads: personalization's LR, as they play the same role
    rank_down: int = 4
    rank_mid: int = 16
    alpha: float | None = None
    targets: str = DEFAULT_PRESET
    init_lomd: str | None = None  # start the Down from this LoMD file (e.g. a distilled one)

    @property
    def identities_per_batch(self) -> int:
        return self.batch_size

    @property
    def shape(self) -> AdapterShape:
        return AdapterShape(self.rank_down, self.rank_mid, self.alpha)

    def settings(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def initial_downs(backend: FluxBackend, config: MetaConfig) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The Down meta-training starts from, and what it was: seeded orthonormal, or ``config.init_lomd``.

    An init LoMD must cover exactly the configured targets with ``rank_down`` rows and fit the model.
    """
    if not config.init_lomd:
        init = orthonormal_downs(backend.dims, config.rank_down, config.targets, config.seed)
        return init, {"kind": "orthonormal", "seed": str(config.seed)}
    lomd = load_lomd(config.init_lomd)
    check_lomd_fits(lomd, fused_shapes(backend.dims), "the FLUX model")
    wanted = [t.name for t in resolve_targets(backend.dims, config.targets)]
    if sorted(lomd.targets) != sorted(wanted) or lomd.shape.rank_down != config.rank_down:
        missing = sorted(set(wanted) - set(lomd.targets)) or sorted(set(lomd.targets) - set(wanted))
        raise MetaLoRAError(
            f"--init-lomd {config.init_lomd}: it has rank_down {lomd.shape.rank_down} on {len(lomd.targets)} "
            f"layers; meta-training asks rank_down {config.rank_down} on {len(wanted)} layers "
            f"('{config.targets}'{f', first difference: {missing[0]}' if missing else ''}). Make the init LoMD "
            "with the same --rank and --targets"
        )
    info = {"kind": "lomd", "fingerprint": lomd.fingerprint, "lomd_source": lomd.origin}
    return {n: lomd.downs[n] for n in wanted}, info


@dataclass
class MetaResult:
    lomd: LoMD
    losses: list[float]
    steps_done: int
    seconds: float
    bank: dict[str, torch.Tensor] | None  # the full head bank, on rank 0 only
    layout: BankLayout


def slot_generator(seed: int, step: int, position: int) -> torch.Generator:
    """The generator for photo slot ``position`` of step ``step``: independent of the process count."""
    return torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, step, position]).generate_state(1)[0])
    )


def _full_shapes(layout: BankLayout, identities: list[int]) -> dict[str, tuple[int, ...]]:
    return {k: s for i in identities for k, s in layout.shapes(i).items()}


class MetaTrainer:
    """The live state of one process's meta-training (build, then :meth:`train`)."""

    def __init__(
        self,
        backend: FluxBackend,
        data: IdentitySet,
        plan: BucketPlan,
        prepared: Prepared,
        config: MetaConfig,
        ctx: DistContext | None = None,
    ) -> None:
        self.backend, self.data, self.plan, self.prepared, self.config = backend, data, plan, prepared, config
        self.ctx = ctx or DistContext()
        if plan.batch_size != config.identities_per_batch:
            raise MetaLoRAError(
                f"the bucket plan was made for batches of {plan.batch_size}, "
                f"the config asks for {config.identities_per_batch}"
            )
        self.sampler = BucketSampler(plan, config.seed)
        dtype = torch.promote_types(backend.dtype, torch.float32)
        init, self.init_info = initial_downs(backend, config)
        self.downs = {n: nn.Parameter(d.to(backend.device, dtype)) for n, d in init.items()}
        shapes = fused_shapes(backend.dims)
        self.layout = BankLayout({n: shapes[n][0] for n in self.downs}, config.rank_down, config.rank_mid)
        self.identities = sorted({data.items[i].identity for idx in plan.groups.values() for i in idx})
        self.bank = HeadBank(self.layout, [i for i in self.identities if self.ctx.owns(i)], config.seed)
        groups = param_groups(list(self.downs.items()), config.lr, {}, config.weight_decay)
        self.optimizer = make_adamw(groups)
        self.scheduler = make_scheduler(
            self.optimizer,
            config.steps,
            config.schedule,
            capped_warmup(config.steps, config.warmup_steps)[0],
            config.cycles,
            config.min_lr_ratio,
        )
        self.generator = torch.Generator().manual_seed(config.seed)  # kept in checkpoints for the format
        self.losses: list[float] = []
        self.step = 0

    # --- checkpoints -------------------------------------------------------------------------------

    def describe(self) -> dict[str, object]:
        """What a checkpoint must agree on: the settings and the data (never the process count)."""
        return {
            **self.config.settings(),
            "identities": len(self.identities),
            "photos": sum(len(v) for v in self.plan.groups.values()),
            "buckets": self.plan.histogram(),
        }

    def _state(self, bank: dict[str, torch.Tensor]) -> TrainState:
        params = {DOWN + n: p for n, p in self.downs.items()}
        params.update({BANK + k: v for k, v in bank.items()})
        return TrainState(params, self.optimizer, self.scheduler, self.generator)  # type: ignore[arg-type]

    def full_bank(self) -> dict[str, torch.Tensor] | None:
        """Every process's heads gathered on rank 0 (a collective: all processes must call it)."""
        return gather_to_main(self.ctx, self.bank.tensors, _full_shapes(self.layout, self.identities))

    def save(self, path: str) -> None:
        bank = self.full_bank()
        if bank is not None:
            save_checkpoint(path, self._state(bank), self.step, self.losses, self.describe())

    def resume(self, path: str) -> None:
        """Load a checkpoint written by any number of processes; keep the heads this process owns."""
        template = {k: torch.zeros(s) for k, s in _full_shapes(self.layout, self.identities).items()}
        self.step, self.losses = load_checkpoint(path, self._state(template), self.describe())
        for k in self.bank.tensors:
            self.bank.tensors[k].copy_(template[k])

    def lomd(self) -> LoMD:
        downs = {n: p.detach().float().cpu().clone() for n, p in self.downs.items()}
        provenance = {"init": self.init_info, "steps": self.step, "identities": len(self.identities)}
        meta = {SOURCE_KEY: "meta-trained", PROVENANCE_KEY: json.dumps(provenance)}
        return LoMD(
            downs, self.config.shape, family_of(self.backend.dims).name, self.backend.dims.hidden, meta
        )

    # --- training ----------------------------------------------------------------------------------

    def _batch_loss(self, step: int, members: list[int], heads: dict[int, nn.ModuleDict]) -> torch.Tensor:
        """Forward + backward of this process's photos of the batch; returns their share of the mean loss."""
        total = torch.zeros((), dtype=torch.float64)
        mine = [(p, i) for p, i in enumerate(members) if self.data.items[i].identity in heads]
        groups: dict[tuple[int, str], list[tuple[int, int]]] = {}
        for p, i in mine:
            groups.setdefault((self.data.items[i].identity, self.prepared.captions[i]), []).append((p, i))
        for (identity, text), slots in sorted(groups.items()):
            x0 = torch.stack([self.prepared.latents[i] for _, i in slots]).to(self.backend.device)
            gens = [slot_generator(self.config.seed, step, p) for p, _ in slots]
            hw = (x0.shape[2], x0.shape[3])
            shift_range = family_of(self.backend.dims).shift_range
            t = torch.cat(
                [
                    sample_timesteps(1, hw, g, self.config.timestep_shift, shift_range=shift_range)
                    for g in gens
                ]
            )
            noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
            with self.backend.adapters(heads[identity]):
                with torch.autocast(self.backend.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
                    loss = flow_loss(
                        self.backend,
                        x0,
                        self.prepared.conds[text],
                        t.to(self.backend.device),
                        noise.to(self.backend.device, x0.dtype),
                        self.config.guidance,
                    )
                share = loss * (len(slots) / len(members))
                share.backward()
            total += float(share.detach())
        return total

    def train_step(self) -> float:
        """One optimizer step of the Down and of the batch's heads; returns the global mean loss."""
        cfg, step = self.config, self.step
        _, members = self.sampler.batch(step)
        ids = sorted(
            {self.data.items[i].identity for i in members if self.ctx.owns(self.data.items[i].identity)}
        )
        lr = float(self.optimizer.param_groups[0]["lr"])
        multiplier = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)  # warm-up/decay; --lr 0 allowed
        heads, head_opt = self.bank.page_in(
            ids,
            self.downs,
            cfg.shape.scale,
            cfg.lr_heads * multiplier,
            cfg.weight_decay,
            self.backend.device,
        )
        local = self._batch_loss(step, members, heads)
        downs = list(self.downs.values())
        all_reduce_grads(self.ctx, downs)
        head_params = [p for g in head_opt.param_groups for p in g["params"] if p.grad is not None]
        head_sq = sum(
            (p.grad.double().pow(2).sum() for p in head_params), torch.zeros((), dtype=torch.float64)
        )
        down_sq = sum((p.grad.double().pow(2).sum() for p in downs), torch.zeros((), dtype=torch.float64))
        loss = float(all_reduce_sum(self.ctx, local))
        norm = math.sqrt(float(down_sq.cpu() + all_reduce_sum(self.ctx, head_sq.cpu())))
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise TrainingDiverged(
                f"meta-training stopped at step {step + 1}: loss {loss}, gradient norm {norm} (lr {lr:.3g}); "
                "lower --lr / --lr-heads or keep gradient clipping on",
                self.lomd(),
            )
        if cfg.max_grad_norm and norm > cfg.max_grad_norm:
            factor = cfg.max_grad_norm / (norm + 1e-6)
            for p in downs + head_params:
                p.grad.mul_(factor)
        self.optimizer.step()
        self.scheduler.step()
        head_opt.step()
        self.bank.page_out(heads, head_opt)
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss)
        self.step += 1
        return loss

    def train(
        self,
        on_progress: Callable[[Progress], None] | None = None,
        every: Callable[[int], None] | None = None,
    ) -> MetaResult:
        """Run to ``config.steps`` (from the checkpoint if ``resume_from``); checkpoints as configured."""
        cfg = self.config
        if cfg.checkpoint_every and not cfg.checkpoint_path:
            raise MetaLoRAError("checkpoint_every needs a checkpoint_path to write to")
        if cfg.resume_from:
            self.resume(cfg.resume_from)
        start, begun = self.step, time.perf_counter()
        if cfg.gradient_checkpointing:
            self.backend.set_gradient_checkpointing(True)
        try:
            self._run(start, begun, on_progress, every)
        finally:
            if cfg.gradient_checkpointing:
                self.backend.set_gradient_checkpointing(False)
        bank = self.full_bank()
        return MetaResult(
            self.lomd(), list(self.losses), self.step, time.perf_counter() - begun, bank, self.layout
        )

    def _run(self, start: int, begun: float, on_progress, every) -> None:
        cfg = self.config
        while self.step < cfg.steps:
            loss = self.train_step()
            done = self.step
            if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                self.save(cfg.checkpoint_path)  # type: ignore[arg-type]
            if every is not None:
                every(done)
            if on_progress is not None and self.ctx.is_main:
                elapsed = time.perf_counter() - begun
                lr = float(self.optimizer.param_groups[0]["lr"])
                on_progress(
                    Progress(done, cfg.steps, loss, lr, elapsed / (done - start) * (cfg.steps - done))
                )
