"""Meta-training on the tiny FLUX: the loss falls, and a run stopped after a checkpoint resumes exactly."""

from __future__ import annotations

import pytest
import torch

from metalora_core.meta.train import MetaConfig, MetaTrainer

FAST = dict(batch_size=2, lr=3e-3, lr_heads=3e-3, warmup_steps=2, rank_mid=4)


def test_loss_falls_and_the_down_moves(build, meta_backend):
    data, plan, prepared = build(2)
    trainer = MetaTrainer(meta_backend, data, plan, prepared, MetaConfig(steps=24, **FAST))
    start = {n: p.detach().clone() for n, p in trainer.downs.items()}
    result = trainer.train()
    first, last = sum(result.losses[:6]) / 6, sum(result.losses[-6:]) / 6
    assert last < 0.85 * first, result.losses
    assert all(not torch.equal(start[n], result.lomd.downs[n]) for n in start)
    assert result.lomd.shape.rank_down == 4 and sorted(result.lomd.targets) == sorted(start)
    # every identity in the plan got a head, and the batch's heads (only) were stepped
    steps = [int(result.bank[f"{i}.step"]) for i in trainer.identities]
    assert sum(steps) >= 24 and min(steps) >= 1


class _Crash(Exception):
    pass


def test_resume_after_a_crash_continues_from_the_checkpoint(build, meta_backend, tmp_path):
    data, plan, prepared = build(2)
    ckpt = str(tmp_path / "run.ckpt.safetensors")
    whole = MetaTrainer(meta_backend, data, plan, prepared, MetaConfig(steps=6, **FAST)).train()

    def crash(step: int) -> None:
        if step == 5:  # after the checkpoint at step 4, before the run ends
            raise _Crash

    cfg = MetaConfig(steps=6, checkpoint_every=2, checkpoint_path=ckpt, **FAST)
    with pytest.raises(_Crash):
        MetaTrainer(meta_backend, data, plan, prepared, cfg).train(every=crash)
    resumed_cfg = MetaConfig(steps=6, resume_from=ckpt, **FAST)
    resumed = MetaTrainer(meta_backend, data, plan, prepared, resumed_cfg)
    result = resumed.train()
    assert result.losses[:4] == whole.losses[:4] and len(result.losses) == 6
    for n in whole.lomd.downs:
        torch.testing.assert_close(result.lomd.downs[n], whole.lomd.downs[n], rtol=0, atol=0)
    for k in whole.bank:
        torch.testing.assert_close(result.bank[k], whole.bank[k], rtol=0, atol=0)
    other = MetaConfig(steps=6, resume_from=ckpt, **{**FAST, "lr": 1e-3})
    with pytest.raises(Exception, match="lr"):
        MetaTrainer(meta_backend, data, plan, prepared, other).train()


def test_lr_zero_keeps_the_down_and_still_trains_the_heads(build, meta_backend):
    """``--lr 0`` once divided the heads' LR by the Down's: ZeroDivisionError."""
    data, plan, prepared = build(2)
    cfg = dict(FAST, lr=0.0)
    trainer = MetaTrainer(meta_backend, data, plan, prepared, MetaConfig(steps=3, **cfg))
    start = {n: p.detach().clone() for n, p in trainer.downs.items()}
    result = trainer.train()
    assert all(torch.equal(start[n], result.lomd.downs[n]) for n in start)
    assert any(float(v.abs().sum()) > 0 for k, v in result.bank.items() if k.endswith(".up"))


def test_init_lomd_is_the_starting_down_and_is_recorded(build, meta_backend, tmp_path):
    import json

    from metalora_core.adapter import AdapterShape
    from metalora_core.errors import MetaLoRAError
    from metalora_core.formats import PROVENANCE_KEY, SOURCE_KEY, save_lomd
    from metalora_core.lomd.seeded import seeded_lomd

    data, plan, prepared = build(2)
    init = seeded_lomd(meta_backend.dims, AdapterShape(4, 4), "attn_mlp", seed=7)
    path = save_lomd(tmp_path / "init.safetensors", init)
    trainer = MetaTrainer(
        meta_backend, data, plan, prepared, MetaConfig(steps=1, init_lomd=str(path), **FAST)
    )
    assert all(torch.equal(trainer.downs[n].detach().float(), init.downs[n]) for n in init.targets)
    lomd = trainer.train().lomd
    assert lomd.metadata[SOURCE_KEY] == "meta-trained"
    assert json.loads(lomd.metadata[PROVENANCE_KEY])["init"] == {
        "kind": "lomd", "fingerprint": init.fingerprint, "lomd_source": "seeded"
    }  # fmt: skip
    wrong = save_lomd(
        tmp_path / "r2.safetensors", seeded_lomd(meta_backend.dims, AdapterShape(2, 4), "attn_mlp")
    )
    with pytest.raises(MetaLoRAError, match="rank_down 2"):
        MetaTrainer(meta_backend, data, plan, prepared, MetaConfig(steps=1, init_lomd=str(wrong), **FAST))
