"""Meta-LoRA and the peft LoRA baseline on the same loop, step for step."""

from __future__ import annotations

import torch

from metalora_core.training.lora_baseline import diffusers_modules, train_lora_baseline
from metalora_core.training.personalize import PersonalizeConfig, personalize


def test_meta_and_lora_baseline_both_train_on_the_same_draws(backend, lomd, views, cond):
    cfg = PersonalizeConfig(steps=25, lr=3e-3, warmup_steps=2, weight_decay=0.0)
    meta = personalize(backend, lomd, views[:1], cond, cfg)
    lora = train_lora_baseline(backend, views[:1], cond, cfg, rank=4, targets=lomd.targets)
    # both start as the untouched model (Up = 0, lora_B = 0) and see the same view, t and noise:
    assert meta.losses[0] == lora.losses[0]
    assert meta.lrs == lora.lrs
    for losses in (meta.losses, lora.losses):
        assert sum(losses[-8:]) < 0.9 * sum(losses[:8])
    modules = diffusers_modules(backend, lomd.targets)
    assert len(lora.lora) == 2 * len(modules)
    assert all(f"transformer.{m}.lora_A.weight" in lora.lora for m in modules)
    assert lora.lora[f"transformer.{modules[0]}.lora_A.weight"].shape[0] == 4
    assert any(float(v.abs().max()) > 0 for k, v in lora.lora.items() if "lora_B" in k)
    # the model is plain again, and a rerun is bit-identical
    assert not any("lora" in n for n, _ in backend.model.named_parameters())
    again = train_lora_baseline(backend, views[:1], cond, PersonalizeConfig(steps=3, lr=3e-3), rank=4)
    twice = train_lora_baseline(backend, views[:1], cond, PersonalizeConfig(steps=3, lr=3e-3), rank=4)
    assert all(torch.equal(again.lora[k], twice.lora[k]) for k in again.lora)
