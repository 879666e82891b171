"""The non-finite gradient guard: a finite loss with non-finite gradients must stop the personalization loop
before the optimizer steps (test_personalize covers a non-finite loss)."""

from __future__ import annotations

import pytest
import torch

from metalora_core.training.personalize import PersonalizeConfig, personalize
from metalora_core.training.schedules import TrainingDiverged
from tests.poison import PoisonGradAfter, PoisonGradOnce

FAST = dict(lr=3e-3, warmup_steps=2, weight_decay=0.0)


def test_nan_gradients_with_a_finite_loss_stop_before_the_step(backend, lomd, views, cond):
    cfg = PersonalizeConfig(steps=6, max_grad_norm=None, **FAST)
    with pytest.raises(TrainingDiverged, match=r"gradient norm became nan at step 4.*after step 3") as info:
        personalize(PoisonGradAfter(backend, 3), lomd, views, cond, cfg)
    kept = info.value.result
    assert kept.steps_done == 3 and len(kept.losses) == 3
    reference = personalize(
        backend, lomd, views, cond, PersonalizeConfig(steps=3, max_grad_norm=None, **FAST)
    )
    for name in reference.adapter.ups:
        assert torch.equal(kept.adapter.ups[name], reference.adapter.ups[name]), name
        assert torch.equal(kept.adapter.mids[name], reference.adapter.mids[name]), name


def test_one_bad_step_freezes_the_weights_even_if_later_steps_are_finite(backend, lomd, views, cond):
    """The host learns of a non-finite step a step late; the device must not update in between."""
    fast = {**FAST, "warmup_steps": 0}  # (a 2-step reference would cap a 2-step warm-up: same LRs needed)
    cfg = PersonalizeConfig(steps=6, **fast)
    with pytest.raises(TrainingDiverged, match=r"gradient norm became nan at step 3.*after step 2") as info:
        personalize(PoisonGradOnce(backend, 2), lomd, views, cond, cfg)
    kept = info.value.result
    reference = personalize(backend, lomd, views, cond, PersonalizeConfig(steps=2, **fast))
    for name in reference.adapter.ups:
        assert torch.equal(kept.adapter.ups[name], reference.adapter.ups[name]), name
        assert torch.equal(kept.adapter.mids[name], reference.adapter.mids[name]), name
