"""Meta-training's non-finite guard: a NaN loss or NaN gradients stop the run before any weight moves, and
the error carries the last finite Down."""

from __future__ import annotations

import pytest
import torch

from metalora_core.meta.train import MetaConfig, MetaTrainer
from metalora_core.training.schedules import TrainingDiverged
from tests.poison import PoisonAfter, PoisonGradAfter


@pytest.mark.parametrize("poison", [PoisonAfter, PoisonGradAfter])
def test_meta_training_stops_on_nan_and_keeps_the_last_finite_down(meta_backend, build, poison):
    data, plan, prepared = build(4)
    config = MetaConfig(steps=4, batch_size=4, lr=3e-3, lr_heads=3e-3, warmup_steps=1, rank_mid=4)
    trainer = MetaTrainer(poison(meta_backend, 10**9), data, plan, prepared, config)
    trainer.train_step()
    trainer.train_step()  # Up is non-zero from here on, so the Down has a gradient to poison
    before = {n: p.detach().clone() for n, p in trainer.downs.items()}
    bank = {k: v.clone() for k, v in trainer.bank.tensors.items()}
    trainer.backend.n = trainer.backend.calls  # every later forward is poisoned
    with pytest.raises(TrainingDiverged, match="meta-training stopped at step 3") as info:
        trainer.train_step()
    assert trainer.step == 2 and len(trainer.losses) == 2
    for name, down in info.value.result.downs.items():
        assert torch.equal(down, before[name].float()), name  # the Down never took the NaN step
    assert all(torch.equal(bank[k], v) for k, v in trainer.bank.tensors.items())  # nor did any head
