"""Aspect-ratio bucketing for many photos and the bucket sampler (the community's scheme, kohya-style).

Plan (fixed for a dataset, batch size and seed): each photo goes to the bucket of nearest aspect among
:func:`metalora_core.buckets.make_buckets` (64-px steps, at most ``resolution**2`` pixels); photos whose
aspect is further than ``max_aspect_error`` (log scale) from every bucket are dropped and counted. In every
bucket the ``n % batch`` photos that cannot fill a batch (a seeded choice) move to the *remainder* bucket
at the base resolution (``resolution x resolution``), so every other batch is full and one shape.

Sampling: per epoch each bucket's photos are shuffled and cut into batches; the next batch comes from a
bucket drawn with probability proportional to the photos it has left, so big buckets are not exhausted
early and small ones do not all come last. The order is a pure function of ``(seed, epoch)``: the state
to resume is the step number alone, whatever the number of processes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ..buckets import aspect_error, make_buckets, nearest_bucket
from ..errors import MetaLoRAError

Bucket = tuple[int, int]  # (width, height) in pixels
REMAINDER = "remainder"


@dataclass
class BucketPlan:
    """Which photo trains at which size. ``groups`` maps a bucket (or :data:`REMAINDER`) to photo indices."""

    groups: dict[Bucket | str, list[int]]
    sizes: dict[Bucket | str, Bucket]  # pixel size of every group (the remainder: base resolution)
    dropped: list[int] = field(default_factory=list)
    batch_size: int = 1

    def bucket_of(self) -> dict[int, Bucket]:
        """Photo index -> the pixel size it is cropped to."""
        return {i: self.sizes[g] for g, idx in self.groups.items() for i in idx}

    def histogram(self) -> dict[str, int]:
        return {(g if isinstance(g, str) else f"{g[0]}x{g[1]}"): len(v) for g, v in self.groups.items()}


def plan_buckets(
    sizes: list[Bucket],
    resolution: int = 512,
    batch_size: int = 1,
    max_aspect_error: float = 0.25,
    seed: int = 0,
    min_side: int | None = None,
) -> BucketPlan:
    """Assign photos of pixel ``sizes`` (w, h) to buckets, drop misfits, gather partial batches."""
    if resolution < 64 or resolution % 64:
        raise MetaLoRAError(f"resolution must be a multiple of 64 (>= 64), got {resolution}")
    if batch_size < 1:
        raise MetaLoRAError(f"batch size must be >= 1, got {batch_size}")
    buckets = make_buckets(resolution, min_side=min_side or min(256, max(64, resolution // 2)))
    groups: dict[Bucket | str, list[int]] = {}
    dropped = []
    for i, (w, h) in enumerate(sizes):
        b = nearest_bucket(w, h, buckets)
        if aspect_error(w, h, b) > max_aspect_error:
            dropped.append(i)
        else:
            groups.setdefault(b, []).append(i)
    rng = np.random.default_rng(seed)
    remainder: list[int] = []
    for b in sorted(groups, key=str):
        members = groups[b]
        extra = len(members) % batch_size
        if extra:
            moved = set(rng.choice(members, size=extra, replace=False).tolist())
            remainder.extend(sorted(moved))
            groups[b] = [i for i in members if i not in moved]
    groups = {b: v for b, v in sorted(groups.items(), key=lambda kv: str(kv[0])) if v}
    out_sizes: dict[Bucket | str, Bucket] = {b: b for b in groups}  # type: ignore[misc]
    if remainder:
        groups[REMAINDER] = sorted(remainder)
        out_sizes[REMAINDER] = (resolution, resolution)
    return BucketPlan(groups, out_sizes, dropped, batch_size)


def draw_probabilities(left: list[int]) -> np.ndarray:
    """The chance of drawing each bucket next: proportional to the photos it has left."""
    total = sum(left)
    if total <= 0:
        raise ValueError("no photos left in any bucket")
    return np.asarray(left, dtype=np.float64) / total


class BucketSampler:
    """Batches ``(group, photo indices)`` step by step; ``batch(step)`` is deterministic, so resumable."""

    def __init__(self, plan: BucketPlan, seed: int = 0) -> None:
        if not plan.groups:
            raise MetaLoRAError(
                "no photo fits any bucket: nothing to train on (see `metalora dataset check`)"
            )
        self.plan = plan
        self.seed = seed
        self.keys = list(plan.groups)
        self.batches_per_epoch = sum(-(-len(v) // plan.batch_size) for v in plan.groups.values())
        self._epoch = lru_cache(maxsize=2)(self._make_epoch)

    def _make_epoch(self, epoch: int) -> list[tuple[Bucket | str, list[int]]]:
        rng = np.random.default_rng([self.seed, epoch])
        b = self.plan.batch_size
        queues = []
        for key in self.keys:
            order = rng.permutation(self.plan.groups[key]).tolist()
            queues.append([order[i : i + b] for i in range(0, len(order), b)])
        left = [sum(len(batch) for batch in q) for q in queues]
        out = []
        while sum(left):
            k = int(rng.choice(len(queues), p=draw_probabilities(left)))
            batch = queues[k].pop(0)
            left[k] -= len(batch)
            out.append((self.keys[k], batch))
        return out

    def batch(self, step: int) -> tuple[Bucket, list[int]]:
        """The pixel size and photo indices of global optimizer step ``step`` (0-based)."""
        epoch, pos = divmod(step, self.batches_per_epoch)
        key, members = self._epoch(epoch)[pos]
        return self.plan.sizes[key], list(members)

    def epoch_counts(self, epoch: int) -> Counter:
        return Counter(key for key, _ in self._epoch(epoch))
