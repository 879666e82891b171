"""Directional finite-difference check of Mid / Up gradients, shared by every family's gradient test."""

from __future__ import annotations

from collections.abc import Callable

import torch


def assert_head_gradients_match(
    loss: Callable[[], torch.Tensor], heads, label: str, eps: float = 1e-6, tolerance: float = 1e-5
) -> dict[str, float]:
    """``loss()`` is evaluated once with backward, then along one random direction per kind (all Mids,
    all Ups) at ``+-eps``: the analytic directional derivative must equal the central difference. Returns the
    relative errors by kind."""
    loss().backward()
    errors = {}
    g = torch.Generator().manual_seed(13)
    for kind in ("mid", "up"):
        params = [getattr(h, kind) for h in heads.values()]
        direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, direction))
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(eps * d)
            plus = float(loss())
            for p, d in zip(params, direction):
                p.sub_(2 * eps * d)
            minus = float(loss())
            for p, d in zip(params, direction):
                p.add_(eps * d)
        numeric = (plus - minus) / (2 * eps)
        assert abs(analytic) > 1e-6, f"{kind}: gradient vanished, the check would be vacuous"
        rel = abs(analytic - numeric) / max(abs(analytic), abs(numeric))
        assert rel < tolerance, f"{kind} ({label}): rel err {rel:.2e}"
        errors[kind] = rel
    return errors
