"""Low-rank algebra of LoRA layers, kept factored: sums by concatenation, SVD of a product ``up @ down``
without forming the ``out x in`` matrix, truncation whose Frobenius error is exactly the dropped spectrum.

A layer's change is ``delta = up @ down`` (``up``: out x r, ``down``: r x in, scales baked into ``up``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import MetaLoRAError

Factors = tuple[torch.Tensor, torch.Tensor]  # (up, down)


@dataclass(frozen=True)
class FactoredSVD:
    """``delta = left @ diag(s) @ right`` with orthonormal columns of ``left`` and rows of ``right``."""

    left: torch.Tensor  # out x k
    s: torch.Tensor  # k, descending
    right: torch.Tensor  # k x in

    @property
    def energy(self) -> float:
        """``||delta||_F^2``."""
        return float((self.s.double() ** 2).sum())


@dataclass(frozen=True)
class Truncation:
    """What truncating one layer kept: rank, energy fraction and the Frobenius error (absolute, relative)."""

    rank: int
    energy_kept: float
    error: float
    relative_error: float


def weighted_sum(terms: Sequence[tuple[Factors, float]]) -> Factors:
    """``sum_i w_i up_i @ down_i`` exactly, as one pair: ``[w_1 up_1 | w_2 up_2 | ...]``, ``[down_1; ...]``."""
    if not terms:
        raise MetaLoRAError("nothing to sum")
    ups = [w * up for (up, _), w in terms]
    downs = [down for (_, down), _ in terms]
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def factored_svd(up: torch.Tensor, down: torch.Tensor) -> FactoredSVD:
    """The exact thin SVD of ``up @ down`` from two QRs and an ``r x r`` SVD (``r`` = inner rank).

    ``up = Qu Ru``, ``down^T = Qd Rd``  ->  ``up @ down = Qu (Ru Rd^T) Qd^T``; the small core's SVD
    ``A S B^T`` gives ``left = Qu A``, ``right = (Qd B)^T``. Cost ``O((out + in) r^2)``, memory
    ``O((out + in) r)``: never the ``out x in`` product."""
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    a, s, bt = torch.linalg.svd(ru @ rd.T)
    return FactoredSVD(qu @ a, s, (qd @ bt.T).T)


def dense_svd(
    delta: torch.Tensor, rank: int | None = None, oversample: int = 16, niter: int = 4
) -> FactoredSVD:
    """SVD of a dense change: exact (``rank`` None) or randomized to ``rank`` (+ ``oversample``) components.

    Randomized: ``torch.svd_lowrank`` with ``niter`` power iterations, exact to float rounding whenever the
    true rank is at most ``rank + oversample``."""
    if rank is None or rank + oversample >= min(delta.shape):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return FactoredSVD(u, s, vh)
    u, s, v = torch.svd_lowrank(delta, q=rank + oversample, niter=niter)
    return FactoredSVD(u, s, v.T)


def choose_rank(
    s: torch.Tensor, rank: int | None = None, energy: float | None = None, total_energy: float | None = None
) -> int:
    """The kept rank: ``rank`` (capped at the spectrum's length), or the smallest rank whose spectral energy
    ``sum s_i^2`` reaches the fraction ``energy`` of the total (``total_energy``, default the spectrum's own:
    pass the true ``||delta||_F^2`` for a partial spectrum; all of it is kept if the fraction is not
    reached); at least 1."""
    if (rank is None) == (energy is None):
        raise MetaLoRAError("give exactly one of a rank or an energy fraction to keep")
    n = int(s.numel())
    if rank is not None:
        if rank < 1:
            raise MetaLoRAError(f"rank {rank}: use 1 or more")
        return max(1, min(rank, n))
    if not 0.0 < energy <= 1.0:
        raise MetaLoRAError(f"energy fraction {energy}: use a number in (0, 1]")
    e = s.double() ** 2
    total = float(e.sum()) if total_energy is None else float(total_energy)
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(e, 0) / total
    reached = int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=e.dtype)))
    return max(1, min(n, reached + 1))


def truncate(svd: FactoredSVD, rank: int, total_energy: float | None = None) -> tuple[Factors, Truncation]:
    """The best rank-``rank`` pair (Eckart-Young), split ``sqrt(s)`` to each side, and its error report.

    ``total_energy`` (``||delta||_F^2``) defaults to the spectrum's; pass the true one when ``svd`` is a
    randomized partial spectrum."""
    k = max(1, min(rank, int(svd.s.numel())))
    root = svd.s[:k].sqrt()
    up = (svd.left[:, :k] * root).contiguous()
    down = (root[:, None] * svd.right[:k]).contiguous()
    e = svd.s.double() ** 2
    total = float(e.sum()) if total_energy is None else float(total_energy)
    kept = float(e[:k].sum())
    err2 = max(total - kept, 0.0)
    report = Truncation(
        k,
        kept / total if total > 0 else 1.0,
        err2**0.5,
        (err2 / total) ** 0.5 if total > 0 else 0.0,
    )
    return (up, down), report


def compress(
    up: torch.Tensor, down: torch.Tensor, rank: int | None = None, energy: float | None = None
) -> tuple[Factors, Truncation]:
    """A factored change truncated to ``rank`` or to a kept ``energy`` fraction (exact SVD, still factored)."""
    svd = factored_svd(up, down)
    return truncate(svd, choose_rank(svd.s, rank, energy))
