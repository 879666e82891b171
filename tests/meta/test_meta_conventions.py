"""Meta-training's objective and its data parallelism, against references that do not share its code path.

- The step's loss and the Down's gradient equal those of the MEAN per-photo loss over the global batch,
  computed photo by photo with the same draws and heads (a sum, or a per-identity mean, fails).
- Two ranks (threads, with an in-process stand-in for ``torch.distributed``'s sum-reduce) end with the
  same Down as each other and as one process with the whole batch: a missing gradient all-reduce fails in
  seconds, where the torchrun test (marked slow) needs a minute.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from metalora_core.meta import distributed
from metalora_core.meta.distributed import DistContext
from metalora_core.meta.train import MetaConfig, MetaTrainer, slot_generator
from metalora_core.training.objective import flow_loss, sample_timesteps
from metalora_core.training.protocol import TextConditioning

FAST = dict(batch_size=4, lr=3e-3, lr_heads=3e-3, warmup_steps=1, rank_mid=4)


def _trainer(backend, build, **overrides) -> MetaTrainer:
    data, plan, prepared = build(4)
    return MetaTrainer(backend, data, plan, prepared, MetaConfig(**{**FAST, **overrides}))


def _reference(trainer: MetaTrainer, heads, members, step):
    """Mean over the batch of each photo's own flow loss, one photo at a time (float64 sum)."""
    cfg, losses = trainer.config, []
    for position, i in enumerate(members):
        identity = trainer.data.items[i].identity
        x0 = trainer.prepared.latents[i][None]
        g = slot_generator(cfg.seed, step, position)
        t = sample_timesteps(1, tuple(x0.shape[2:]), g, cfg.timestep_shift)
        noise = torch.randn(x0.shape[1:], generator=g)[None]
        cond: TextConditioning = trainer.prepared.conds[trainer.prepared.captions[i]]
        with trainer.backend.adapters(heads[identity]):
            losses.append(flow_loss(trainer.backend, x0, cond, t, noise, cfg.guidance))
    return torch.stack([v.double() for v in losses]).mean()


def test_step_loss_and_down_gradient_are_those_of_the_mean_per_photo_loss(meta_backend, build, monkeypatch):
    trainer = _trainer(meta_backend, build, steps=3, max_grad_norm=None)
    trainer.train_step()  # Up starts at zero (no Down gradient); after one step it is not
    step = trainer.step
    _, members = trainer.sampler.batch(step)
    identities = [trainer.data.items[i].identity for i in members]
    assert len(set(identities)) > 1, "the check needs a batch that mixes identities"

    seen = {}
    page_in = trainer.bank.page_in

    def snapshot(*args, **kwargs):
        heads, optimizer = page_in(*args, **kwargs)
        seen["heads"] = copy.deepcopy(heads)  # one deepcopy: the copies still share one Down per layer
        return heads, optimizer

    step_down = trainer.optimizer.step

    def capture(*args, **kwargs):
        seen["grads"] = {n: p.grad.detach().clone() for n, p in trainer.downs.items()}
        return step_down(*args, **kwargs)

    monkeypatch.setattr(trainer.bank, "page_in", snapshot)
    monkeypatch.setattr(trainer.optimizer, "step", capture)
    loss = trainer.train_step()

    heads = seen["heads"]
    expected = _reference(trainer, heads, members, step)
    assert loss == pytest.approx(float(expected.detach()), rel=1e-5)
    expected.backward()
    downs = {n: h.down for mods in heads.values() for k, h in mods.items() for n in [k.replace("__", ".")]}
    for name, grad in seen["grads"].items():
        ref = downs[name].grad
        assert float(ref.abs().max()) > 0, name
        torch.testing.assert_close(grad, ref.to(grad.dtype), rtol=1e-4, atol=1e-7)


class _ThreadGroup:
    """The two collectives meta-training uses (sum all-reduce, sum reduce to rank 0), across threads."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=120)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.local = threading.local()
        self.calls = 0

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        rank = self.local.rank
        self.slots[rank] = tensor.detach().clone()
        self.barrier.wait()
        total = self.slots[0].clone()
        for other in self.slots[1:]:
            total += other
        self.barrier.wait()
        if rank == 0:
            self.calls += 1
        return total

    def all_reduce(self, tensor: torch.Tensor, op=None, group=None) -> None:
        tensor.copy_(self._sum(tensor))

    def reduce(self, tensor: torch.Tensor, dst: int = 0, op=None, group=None) -> None:
        total = self._sum(tensor)
        if self.local.rank == dst:
            tensor.copy_(total)


def test_two_ranks_match_each_other_and_one_process(meta_assets, meta_backend, build, monkeypatch):
    from metalora_core.training.diffusers_backend import DiffusersBackend

    group = _ThreadGroup(2)
    monkeypatch.setattr(distributed, "dist", group)
    data, plan, prepared = build(4)
    config = MetaConfig(steps=3, **FAST)
    results, errors = {}, []
    # one model per rank, as processes have; loaded here, since model loading is not thread-safe
    backends = [DiffusersBackend.from_path(meta_assets["flux"]) for _ in (0, 1)]

    def rank(r: int) -> None:
        group.local.rank = r
        try:
            trainer = MetaTrainer(backends[r], data, plan, prepared, config, DistContext(r, 2))
            results[r] = trainer.train()
        except BaseException as exc:  # surface it in the test, and free the other rank
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert group.calls > 0, "meta-training never reduced anything across ranks"
    monkeypatch.undo()

    rank0, rank1 = results[0].lomd, results[1].lomd
    for n in rank0.downs:
        assert torch.equal(rank0.downs[n], rank1.downs[n]), n  # the same summed gradient on every rank
    single = MetaTrainer(meta_backend, data, plan, prepared, config).train()
    for n in rank0.downs:
        torch.testing.assert_close(rank0.downs[n], single.lomd.downs[n], rtol=0, atol=1e-5)
    assert results[0].losses == pytest.approx(single.losses, rel=1e-5)
    assert results[1].bank is None and set(results[0].bank) == set(single.bank)
    for k in single.bank:
        torch.testing.assert_close(results[0].bank[k], single.bank[k], rtol=0, atol=1e-5)


def test_heads_follow_the_downs_schedule_scaled_to_their_own_lr(meta_backend, build, monkeypatch):
    """The heads' LR is ``lr_heads`` times the same warm-up/decay multiplier as the Down's, every step."""
    from metalora_core.training.schedules import lr_multiplier

    trainer = _trainer(meta_backend, build, steps=5, warmup_steps=2, schedule="linear", lr_heads=2e-3)
    seen = []
    page_in = trainer.bank.page_in

    def record(ids, downs, scale, lr, weight_decay, device):
        seen.append((lr, float(trainer.optimizer.param_groups[0]["lr"])))
        return page_in(ids, downs, scale, lr, weight_decay, device)

    monkeypatch.setattr(trainer.bank, "page_in", record)
    for _ in range(5):
        trainer.train_step()
    for step, (head_lr, down_lr) in enumerate(seen):
        multiplier = lr_multiplier(step, 5, "linear", warmup=2)
        assert head_lr == pytest.approx(2e-3 * multiplier, rel=1e-9), step
        assert down_lr == pytest.approx(FAST["lr"] * multiplier, rel=1e-9), step
