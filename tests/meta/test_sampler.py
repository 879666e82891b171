"""The bucket plan and sampler against the algorithm: nearest-aspect buckets, drops, remainder gathering,
draws proportional to what is left, and determinism (the step alone locates a batch)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from metalora_core.buckets import make_buckets
from metalora_core.errors import MetaLoRAError
from metalora_core.meta.sampler import REMAINDER, BucketSampler, draw_probabilities, plan_buckets


def _sizes():
    # 11 square, 7 landscape 3:2, 5 portrait 2:3, 2 panoramas 8:1 (too wide at 512 with error 0.25)
    return [(600, 600)] * 11 + [(900, 600)] * 7 + [(600, 900)] * 5 + [(4000, 500)] * 2


def test_plan_assigns_nearest_bucket_drops_misfits_and_gathers_partials():
    plan = plan_buckets(_sizes(), resolution=512, batch_size=4, max_aspect_error=0.25, seed=3)
    assert plan.dropped == [23, 24]
    buckets = make_buckets(512, min_side=256)
    for group, members in plan.groups.items():
        if group == REMAINDER:
            continue
        assert group in buckets and len(members) % 4 == 0  # every non-remainder batch is full
    # 11 % 4 + 7 % 4 + 5 % 4 = 3 + 3 + 1 photos cannot fill a batch: they train at the base resolution
    assert len(plan.groups[REMAINDER]) == 7 and plan.sizes[REMAINDER] == (512, 512)
    placed = sorted(i for v in plan.groups.values() for i in v)
    assert placed == list(range(23))
    assert plan_buckets(_sizes(), 512, 4, 0.25, seed=3).groups == plan.groups  # seeded


def test_every_photo_once_per_epoch_and_only_the_remainder_has_a_short_batch():
    plan = plan_buckets(_sizes(), 512, 4, 0.25, seed=0)
    sampler = BucketSampler(plan, seed=1)
    seen = []
    for step in range(sampler.batches_per_epoch):
        size, members = sampler.batch(step)
        if len(members) < 4:
            assert size == (512, 512) and members[0] in plan.groups[REMAINDER]
        seen.extend(members)
    assert sorted(seen) == sorted(i for v in plan.groups.values() for i in v)
    assert sampler.batches_per_epoch == 2 + 1 + 1 + 2  # 8/4 + 4/4 + 4/4 full, remainder 7 -> 2 batches
    assert sampler.batch(2) == BucketSampler(plan, seed=1).batch(2)  # resumable from the step alone
    epoch0 = [sampler.batch(s) for s in range(sampler.batches_per_epoch)]
    epoch1 = [sampler.batch(s + sampler.batches_per_epoch) for s in range(sampler.batches_per_epoch)]
    assert epoch0 != epoch1  # reshuffled per epoch


def test_draw_probabilities_are_proportional_to_what_is_left():
    np.testing.assert_allclose(draw_probabilities([6, 3, 0, 1]), [0.6, 0.3, 0.0, 0.1])
    with pytest.raises(ValueError):
        draw_probabilities([0, 0])


def test_first_draws_follow_bucket_sizes_and_no_bucket_runs_dry_early():
    # three buckets of 30, 10 and 5 full batches (of 2): proportional draws make each bucket's batches
    # spread evenly over the epoch (a uniformly random interleaving), so none is exhausted early
    sizes = [(512, 512)] * 60 + [(768, 320)] * 20 + [(320, 768)] * 10
    plan = plan_buckets(sizes, 512, 2, 0.25, seed=0)
    assert REMAINDER not in plan.groups
    sampler = BucketSampler(plan, seed=0)
    n = sampler.batches_per_epoch
    epochs = 400
    first = Counter()
    position = {k: [] for k in plan.groups}
    for e in range(epochs):
        order = sampler._make_epoch(e)
        first[order[0][0]] += 1
        for pos, (key, _) in enumerate(order):
            position[key].append(pos / (n - 1))
    for key, members in plan.groups.items():
        p = len(members) / 90
        sigma = math.sqrt(p * (1 - p) / epochs)
        assert abs(first[key] / epochs - p) < 4 * sigma, (key, first[key])
        mean = float(np.mean(position[key]))
        assert abs(mean - 0.5) < 4 * math.sqrt(1 / 12 / len(position[key])) + 0.01, (key, mean)


def test_bad_settings_are_user_errors():
    with pytest.raises(MetaLoRAError, match="multiple of 64"):
        plan_buckets([(100, 100)], resolution=100)
    with pytest.raises(MetaLoRAError, match="no photo fits"):
        BucketSampler(plan_buckets([(4000, 100)], 512, 1, 0.25))
