"""Learning-rate schedule values and optimizer parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from metalora_core.errors import MetaLoRAError
from metalora_core.training.schedules import lr_multiplier, make_adamw, make_scheduler, param_groups


def test_warmup_then_each_schedule():
    warm = [lr_multiplier(s, 14, "constant", warmup=4) for s in range(4)]
    assert warm == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr_multiplier(4, 14, "constant", warmup=4) == 1.0 and lr_multiplier(13, 14, "constant", 4) == 1.0
    # after 4 warm-up steps, 10 decay steps: progress = (s - 4) / 10
    assert [lr_multiplier(s, 14, "linear", 4) for s in (4, 9, 14)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_multiplier(9, 14, "linear", 4, min_ratio=0.2) == pytest.approx(0.6)
    assert [lr_multiplier(s, 14, "cosine", 4) for s in (4, 9, 14)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_multiplier(6, 14, "cosine", 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    # two cycles over 10 steps: restart at step 4 + 5
    restarts = [lr_multiplier(s, 14, "cosine_restarts", 4, cycles=2) for s in range(4, 14)]
    assert restarts[0] == 1.0 and restarts[5] == 1.0
    assert restarts[1:5] == pytest.approx(restarts[6:10])
    assert restarts[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.8)))
    with pytest.raises(MetaLoRAError, match="schedule"):
        lr_multiplier(0, 10, "step")


def test_scheduler_drives_optimizer_and_groups():
    mid = torch.nn.Parameter(torch.zeros(2))
    up = torch.nn.Parameter(torch.zeros(2))
    other = torch.nn.Parameter(torch.zeros(2))
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    named = [("a.mid", mid), ("a.up", up), ("b.other", other), ("c.frozen", frozen)]
    groups = param_groups(named, 1e-3, {".mid": 2e-3, ".up": None}, weight_decay=0.1)
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [
        (".mid", 2e-3, 1),
        ("default", 1e-3, 2),
    ]
    opt = make_adamw(groups)
    sched = make_scheduler(opt, 10, "linear", warmup=1)
    seen = []
    for _ in range(3):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx([1e-3, 5e-4]) and seen[1] == pytest.approx([2e-3, 1e-3])
    assert seen[2] == pytest.approx([2e-3 * 8 / 9, 1e-3 * 8 / 9])
    with pytest.raises(MetaLoRAError, match="nothing to train"):
        param_groups([("c.frozen", frozen)], 1e-3)


def test_warmup_longer_than_the_run_is_capped_so_the_last_step_reaches_the_lr(backend, lomd, views, cond):
    from metalora_core.training.personalize import PersonalizeConfig, personalize
    from metalora_core.training.schedules import capped_warmup

    assert capped_warmup(10, 5) == (5, None) and capped_warmup(10, 9) == (9, None)
    capped, note = capped_warmup(10, 20)
    assert capped == 9 and "capped at 9 steps (asked 20)" in note
    assert capped_warmup(1, 20)[0] == 0
    result = personalize(backend, lomd, views, cond, PersonalizeConfig(steps=4, lr=1e-3, warmup_steps=20))
    assert result.lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # 1/4 .. 4/4 of the set rate
    assert any("warm-up capped at 3 steps (asked 20)" in n for n in result.notes)
