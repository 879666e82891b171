"""Using several adapters at sampling time: which adapters run in which denoiser pass, and how the passes'
predictions combine. Free of ComfyUI; the nodes only execute the plan this module returns.

Three strategies (each adapter ``i`` has a strength ``s_i``; composite also a weight ``w_i``):

- merge: one pass, every adapter active: ``W + sum_i s_i dW_i``;
- switch: one pass, only adapter ``(step // every) % n`` active, so adapters take turns every ``every`` steps;
- composite: ``n`` passes per step, pass ``i`` with only adapter ``i`` active, predictions averaged with
  ``w_i / sum_j w_j``. A strong style adapter then cannot dilute an identity inside one forward, at ``n`` times
  the denoiser cost.

A plan is a list of ``(multipliers, weight)``: one entry per denoiser pass, ``multipliers[i]`` the strength of
adapter ``i`` in that pass (0 = off) and ``weight`` its share of the combined prediction (shares sum to 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import MetaLoRAError

STRATEGIES = ("merge", "switch", "composite")

Plan = list[tuple[list[float], float]]


@dataclass(frozen=True)
class Composition:
    """The strategy and the per-adapter numbers (names only label error messages)."""

    strategy: str
    strengths: tuple[float, ...]
    weights: tuple[float, ...]
    every: int = 1
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise MetaLoRAError(f"unknown composition strategy '{self.strategy}' (use one of {STRATEGIES})")
        if not self.strengths:
            raise MetaLoRAError("a composition needs at least one adapter")
        if len(self.weights) != len(self.strengths):
            raise MetaLoRAError(f"{len(self.strengths)} strengths but {len(self.weights)} weights")
        if self.every < 1:
            raise MetaLoRAError(f"switch every {self.every} steps: use 1 or more")
        if self.strategy == "composite":
            normalized_weights(self.weights, self.names)


def normalized_weights(weights: Sequence[float], names: Sequence[str] = ()) -> list[float]:
    """``w_i / sum w``; negative weights or an all-zero sum are refused (the mean would be meaningless)."""
    for i, w in enumerate(weights):
        if w < 0:
            name = names[i] if i < len(names) else f"adapter {i}"
            raise MetaLoRAError(f"composite weight of {name} is {w}: weights must be >= 0")
    total = float(sum(weights))
    if total <= 0:
        raise MetaLoRAError("composite weights sum to 0: give at least one adapter a positive weight")
    return [float(w) / total for w in weights]


def switch_active(step: int, every: int, count: int) -> int:
    """The adapter active at ``step`` when ``count`` adapters take turns every ``every`` steps."""
    return (step // every) % count


def step_index(sample_sigmas: torch.Tensor, sigma: float, rtol: float = 1e-4) -> int:
    """Index of the sampling step that evaluates the model at ``sigma`` (the last schedule entry >= sigma).

    Exact at the schedule's own sigmas; a multi-stage sampler's intermediate evaluation between
    ``sigmas[i]`` and ``sigmas[i+1]`` counts as step ``i``."""
    sigmas = sample_sigmas.detach().double().cpu().flatten()
    if sigmas.numel() == 0:
        return 0
    reached = torch.nonzero(sigmas >= float(sigma) * (1.0 - rtol)).flatten()
    if reached.numel() == 0:
        return 0
    return int(min(int(reached.max()), max(sigmas.numel() - 2, 0)))


def plan(composition: Composition, step: int) -> Plan:
    """The denoiser passes of one step (see the module docstring)."""
    s = [float(x) for x in composition.strengths]
    n = len(s)
    if composition.strategy == "merge":
        return [(s, 1.0)]
    if composition.strategy == "switch":
        active = switch_active(step, composition.every, n)
        return [([s[i] if i == active else 0.0 for i in range(n)], 1.0)]
    shares = normalized_weights(composition.weights, composition.names)
    return [([s[i] if i == j else 0.0 for i in range(n)], shares[j]) for j in range(n) if shares[j] > 0]


def combine(predictions: Sequence[torch.Tensor], shares: Sequence[float]) -> torch.Tensor:
    """``sum_j share_j * prediction_j``, accumulated in float32 or wider (one pass is returned as is)."""
    if len(predictions) != len(shares) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(shares)} shares")
    if len(predictions) == 1 and shares[0] == 1.0:
        return predictions[0]
    first = predictions[0]
    acc_dtype = torch.promote_types(first.dtype, torch.float32)
    out = torch.zeros(first.shape, dtype=acc_dtype, device=first.device)
    for p, w in zip(predictions, shares):
        out += p.to(acc_dtype) * w
    return out.to(first.dtype)


def merged_weight(
    weight: torch.Tensor, deltas: Sequence[torch.Tensor], strengths: Sequence[float]
) -> torch.Tensor:
    """``W + sum_i s_i dW_i`` in float64: the reference merge is tested against."""
    out = weight.double().clone()
    for d, s in zip(deltas, strengths):
        out += float(s) * d.double()
    return out
