"""The sync-free training step (draws ahead, device-side guard, fused AdamW, late reads) trains exactly as the
step it replaced, and never makes the host read a device value inside a step.

The reference is the old step written out below from its last version: per step the view, timestep and
noise drawn from the seeded generator, ``float(loss)`` and the non-finite checks on the host, per-parameter
AdamW, per-tensor clipping. Same seed: same losses and weights, to float tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from metalora_core.inject import make_heads
from metalora_core.training import step as step_module
from metalora_core.training.objective import flow_loss, sample_timesteps
from metalora_core.training.personalize import PersonalizeConfig, head_dtype, personalize
from metalora_core.training.schedules import make_scheduler, param_groups
from metalora_core.training.step import TrainStep

HOST_READS = {"item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy"}


class HostReads(TorchFunctionMode):
    """Every tensor method that hands a value to Python (on a GPU each one waits for the device)."""

    def __init__(self, events: list | None = None) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.events = events

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.seen.append(name)
            if self.events is not None:
                self.events.append(("host", name))
        return func(*args, **(kwargs or {}))


def old_loop(backend, lomd, views, cond, cfg: PersonalizeConfig, weights=None):
    """The pre-sync-free personalization loop, step for step (losses, final Mid/Up by head name)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        heads = make_heads(backend.dims, lomd, rank_mid=cfg.rank_mid, dtype=head_dtype(backend))
    named = list(heads.named_parameters())
    groups = param_groups(named, cfg.lr, {".mid": cfg.lr_mid, ".up": cfg.lr_up}, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, foreach=False)
    scheduler = make_scheduler(
        optimizer, cfg.steps, cfg.schedule, cfg.warmup_steps, cfg.cycles, cfg.min_lr_ratio
    )
    x0_all = torch.stack(views)
    w_all = None if weights is None else torch.stack(weights)
    g = torch.Generator().manual_seed(cfg.seed)
    losses = []
    with backend.adapters(heads):
        for _ in range(cfg.steps):
            idx = torch.randint(len(views), (cfg.batch_size,), generator=g)
            t = sample_timesteps(cfg.batch_size, tuple(x0_all.shape[2:]), g, cfg.timestep_shift)
            x0 = x0_all[idx]
            noise = torch.randn(x0.shape, generator=g)
            loss = flow_loss(backend, x0, cond, t, noise, cfg.guidance, None if w_all is None else w_all[idx])
            value = float(loss.detach())
            assert math.isfinite(value)
            loss.backward()
            params = [p for _, p in named if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=False)
            assert math.isfinite(float(norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(value)
    return losses, {name: p.detach().clone() for name, p in named}


@pytest.mark.parametrize("variant", ["plain", "batch2_mask_cosine"])
def test_new_step_equals_the_old_one_over_20_steps(backend, lomd, views, cond, variant):
    cfg = PersonalizeConfig(steps=20, lr=3e-3, warmup_steps=3, seed=4)
    weights = None
    if variant != "plain":
        cfg = PersonalizeConfig(steps=20, lr=3e-3, warmup_steps=3, seed=5, batch_size=2, schedule="cosine")
        weights = [torch.ones(1, 8, 8) + (torch.arange(8.0) > 3).float().view(1, 1, 8) for _ in views]
    want_losses, want = old_loop(backend, lomd, views, cond, cfg, weights)
    result = personalize(backend, lomd, views, cond, cfg, weights=weights)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(want_losses), rtol=1e-5, atol=1e-7)
    for name, value in want.items():
        kind = "mids" if name.endswith("mid") else "ups"
        got = getattr(result.adapter, kind)[name.rsplit(".", 1)[0].replace("__", ".")]
        torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-6, msg=name)
    assert max(v.abs().max() for n, v in want.items() if n.endswith("up")) > 1e-3  # Up really moved


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_training_step_reads_nothing_back_from_the_device(backend, lomd, views, cond, checkpointing):
    heads = make_heads(backend.dims, lomd)
    params = list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    step = TrainStep(backend, params, optimizer, cond, max_grad_norm=1.0, guidance=1.0, bf16=False)
    x0 = torch.stack(views[:1])
    mask = torch.ones(1, 1, 8, 8)
    backend.set_gradient_checkpointing(checkpointing)
    try:
        with backend.adapters(heads), HostReads() as reads:
            for _ in range(3):
                loss, norm = step(x0, torch.tensor([0.4]), torch.randn(x0.shape), mask)
                step.release()
    finally:
        backend.set_gradient_checkpointing(False)
    assert reads.seen == [], f"a step read {reads.seen} back to the host"
    assert loss.ndim == 0 and norm.ndim == 0 and float(step.flag) == 0.0


def test_the_loop_reads_each_step_once_and_one_step_late(backend, lomd, views, cond, monkeypatch):
    """The host reads each step's loss after the next step was enqueued: never the step it just queued."""
    events: list[tuple[str, int]] = []
    real_record, real_ready = step_module.StepLog.record, step_module.StepLog.ready

    def record(self, step, loss, norm):
        events.append(("queued", step))
        return real_record(self, step, loss, norm)

    def ready(self, keep_newest=True):
        out = real_ready(self, keep_newest)
        events.extend(("read", s) for s, _, _ in out)
        return out

    monkeypatch.setattr(step_module.StepLog, "record", record)
    monkeypatch.setattr(step_module.StepLog, "ready", ready)
    seen = []
    with HostReads(events):
        personalize(
            backend, lomd, views, cond, PersonalizeConfig(steps=6, warmup_steps=0), on_progress=seen.append
        )
    assert [p.step for p in seen] == [1, 2, 3, 4, 5, 6]
    training = events[events.index(("queued", 0)) : events.index(("read", 5)) + 1]
    host = [e for e in training if e[0] == "host"]
    assert host == [("host", "tolist")] * 6, training  # one read per step: the log's, nothing else
    for step in range(5):  # step k is read only once step k+1 is queued
        assert events.index(("queued", step + 1)) < events.index(("read", step)), events
    assert [e for e in events if e[0] != "host"][-1] == ("read", 5)  # the last step: read as the loop ends


def test_draws_ahead_equal_draws_per_step():
    """The chunked draws are the per-step draws of the old loop (same generator, same order)."""
    from metalora_core.training.draws import StepDraws

    g_old, g_new = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    draws = StepDraws(g_new, 3, 2, (16, 8, 6), True, torch.device("cpu"), 0, 10, chunk=4)
    for step in range(10):
        idx = torch.randint(3, (2,), generator=g_old)
        t = sample_timesteps(2, (8, 6), g_old, True)
        noise = torch.randn((2, 16, 8, 6), generator=g_old)
        got = draws.take(step)
        assert torch.equal(got[0], idx) and torch.equal(got[1], t) and torch.equal(got[2], noise)
        # what a checkpoint after step + 1 steps stores: the old loop's generator state at that point
        assert torch.equal(draws.state_before(step + 1), g_old.get_state())
    assert draws.drawn_until == 10  # never drawn past the run's end
