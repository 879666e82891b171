"""Float64 finite-difference check of Mid and Up gradients through diffusers' FLUX blocks.

DESIGN decision 4: in-place residual updates under checkpointing gave silently wrong gradients elsewhere.
These checks run with and without (non-reentrant) block checkpointing; they fail if any block the loop
differentiates through corrupts autograd.
"""

from __future__ import annotations

import pytest
import torch

from metalora_core.inject import make_heads
from metalora_core.training.objective import flow_loss
from tests.gradcheck import assert_head_gradients_match


def _loss_fn(backend64, heads, cond, views):
    x0 = views[0].unsqueeze(0).double()
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0.63], dtype=torch.float64)

    def loss() -> torch.Tensor:
        return flow_loss(backend64, x0, cond, t, noise, guidance=1.0)

    return loss


@pytest.mark.parametrize("checkpointing", [False, True])
def test_mid_up_gradients_match_finite_differences(backend64, lomd, cond, views, checkpointing, full_float64):
    torch.manual_seed(3)
    heads = make_heads(backend64.dims, lomd, dtype=torch.float64)
    with torch.no_grad():  # non-zero Up so Mid gets a gradient too
        for head in heads.values():
            head.up.normal_(0.0, 0.05)
    cond64 = type(cond)(cond.context.double(), cond.pooled.double())
    loss = _loss_fn(backend64, heads, cond64, views)
    backend64.set_gradient_checkpointing(checkpointing)
    try:
        with backend64.adapters(heads):
            assert backend64.model.gradient_checkpointing is checkpointing
            assert_head_gradients_match(loss, heads, f"checkpointing={checkpointing}")
    finally:
        backend64.set_gradient_checkpointing(False)
    assert not any("Bypass" in type(m).__name__ for m in backend64.model.modules())


def test_checkpointed_gradients_equal_plain(backend64, lomd, cond, views, full_float64):
    """Checkpointing recomputes the same graph: gradients agree with the plain run to float64 rounding."""
    cond64 = type(cond)(cond.context.double(), cond.pooled.double())
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(3)
        heads = make_heads(backend64.dims, lomd, dtype=torch.float64)
        with torch.no_grad():
            for head in heads.values():
                head.up.normal_(0.0, 0.05)
        backend64.set_gradient_checkpointing(checkpointing)
        try:
            with backend64.adapters(heads):
                _loss_fn(backend64, heads, cond64, views)().backward()
        finally:
            backend64.set_gradient_checkpointing(False)
        grads.append(torch.cat([p.grad.reshape(-1) for p in heads.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_precision_patch_is_identity_in_float32(backend, cond, views, request):
    """The float64 fixture only changes precision: in float32 the model output is bit-identical."""
    x = torch.stack(views[:2])
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        before = backend.velocity(x, t, cond, 1.0)
        request.getfixturevalue("full_float64")
        after = backend.velocity(x, t, cond, 1.0)
    assert torch.equal(before, after)
