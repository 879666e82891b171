"""Stage 1: meta-train a LoMD (the shared Meta-Down) over many identities.

Public API: :func:`load_identity_set` / :func:`screen_faces` (data), :func:`plan_buckets` and
:class:`BucketSampler` (aspect buckets), :func:`prepare` (cached latents and text), :class:`MetaConfig` and
:class:`MetaTrainer` (training, DDP-aware via :func:`init_from_env`), :class:`HoldoutCheck`.
"""

from .dataset import IdentitySet, ImageItem, load_identity_set, screen_faces, split_holdout
from .distributed import DistContext, init_from_env, shutdown
from .holdout import HoldoutCheck
from .prepare import Prepared, prepare
from .sampler import BucketPlan, BucketSampler, plan_buckets
from .train import MetaConfig, MetaResult, MetaTrainer

__all__ = [
    "BucketPlan",
    "BucketSampler",
    "DistContext",
    "HoldoutCheck",
    "IdentitySet",
    "ImageItem",
    "MetaConfig",
    "MetaResult",
    "MetaTrainer",
    "Prepared",
    "init_from_env",
    "load_identity_set",
    "plan_buckets",
    "prepare",
    "screen_faces",
    "shutdown",
    "split_holdout",
]
