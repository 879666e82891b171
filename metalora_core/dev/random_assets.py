"""Random LoMDs and identity adapters for a given model: for testing loading, patching and export."""

from __future__ import annotations

import os

import torch

from ..adapter import AdapterShape
from ..formats import SOURCE_KEY, IdentityAdapter, LoMD
from ..model_files import read_model_dims
from ..models import family_of
from ..targets import DEFAULT_PRESET, FluxDims, resolve_targets


def random_lomd(
    model_path: str | os.PathLike,
    shape: AdapterShape | None = None,
    preset: str = DEFAULT_PRESET,
    seed: int = 0,
) -> LoMD:
    """Orthonormal-row random Downs (as a meta-learned Down is well conditioned) for the model's targets."""
    shape = shape or AdapterShape()
    dims, _ = read_model_dims(model_path)
    downs = orthonormal_downs(dims, shape.rank_down, preset, seed)
    return LoMD(downs, shape, family_of(dims).name, dims.hidden, {SOURCE_KEY: "random"})


def orthonormal_downs(
    dims: FluxDims, rank_down: int, preset: str | list[str] = DEFAULT_PRESET, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A ``rank_down x in`` Down with orthonormal rows per target (also meta-training's starting point)."""
    g = torch.Generator().manual_seed(seed)
    downs = {}
    for target in resolve_targets(dims, preset):
        q, _ = torch.linalg.qr(torch.randn(target.in_features, rank_down, generator=g))
        downs[target.name] = q.T.contiguous()
    return downs


def random_adapter(
    lomd: LoMD, model_path: str | os.PathLike, seed: int = 0, up_std: float = 0.02
) -> IdentityAdapter:
    """An identity adapter with non-zero Up, so patching visibly changes the model."""
    dims, _ = read_model_dims(model_path)
    shapes = {t.name: t.out_features for t in resolve_targets(dims, "all_linear")}
    g = torch.Generator().manual_seed(seed)
    r_m, r_d = lomd.shape.rank_mid, lomd.shape.rank_down
    mids = {n: torch.randn(r_m, r_d, generator=g) / r_d**0.5 for n in lomd.targets}
    ups = {n: up_std * torch.randn(shapes[n], r_m, generator=g) for n in lomd.targets}
    return IdentityAdapter(
        mids,
        ups,
        lomd.shape,
        lomd.fingerprint,
        {"dev": "random-adapter", "seed": seed},
        family_of(dims).name,
        dims.hidden,
    )
