"""Meta-training's forward runs without cuDNN attention, like personalization's (tests/training/test_attention)."""

from __future__ import annotations

from metalora_core.meta.train import MetaConfig, MetaTrainer
from tests.sdpa_spy import TRAINING_FLAGS, attention_spy


def test_meta_training_forward_and_recompute_run_without_cudnn(build, meta_backend):
    data, plan, prepared = build(2)
    config = MetaConfig(steps=1, batch_size=2, warmup_steps=0, rank_mid=4, gradient_checkpointing=True)
    trainer = MetaTrainer(meta_backend, data, plan, prepared, config)
    with attention_spy(meta_backend.model) as (seen, n_attn):
        trainer.train()
    assert len(seen) >= 2 * n_attn  # forward and checkpoint recompute of at least one photo group
    assert all(f == TRAINING_FLAGS for f in seen), seen
