"""Exact math of the three-layer adapter, checked in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metalora_core.adapter import (
    AdapterShape,
    BypassLinear,
    IdentityHead,
    delta_weight,
    fold_to_lora,
    merge_into,
    unmerge_from,
)


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _head(out_f=24, in_f=16, r_d=4, r_m=8, scale=0.75, seed=0):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(r_d, in_f, generator=g, dtype=torch.float64)
    return IdentityHead(
        down, out_f, r_m, scale, up_init=torch.randn(out_f, r_m, generator=g, dtype=torch.float64)
    )


def test_scale_follows_alpha_over_rank_down():
    assert AdapterShape(4, 16).scale == 1.0
    assert AdapterShape(4, 16, alpha=8).scale == 2.0
    assert AdapterShape(8, 16, alpha=4).scale == 0.5
    with pytest.raises(ValueError):
        AdapterShape(0, 16)


def test_fresh_head_changes_nothing():
    down = torch.randn(4, 16, dtype=torch.float64)
    head = IdentityHead(down, 24, 8, 1.0)
    base = nn.Linear(16, 24).double()
    x = torch.randn(3, 16, dtype=torch.float64)
    assert torch.equal(BypassLinear(base, head)(x), base(x))
    assert torch.count_nonzero(head.mid) > 0


def test_bypass_equals_merged_weight():
    head = _head()
    base = nn.Linear(16, 24).double()
    x = torch.randn(5, 7, 16)
    bypass = BypassLinear(base, head)(x)
    merged = nn.Linear(16, 24).double()
    merged.load_state_dict(base.state_dict())
    merge_into(merged.weight.data, head.delta_weight().detach())
    assert (bypass - merged(x)).abs().max().item() < 1e-10
    assert not torch.equal(bypass, base(x))


def test_bypass_never_touches_base_weight():
    head = _head()
    base = nn.Linear(16, 24).double()
    before = base.weight.detach().clone()
    layer = BypassLinear(base, head)
    layer(torch.randn(4, 16)).sum().backward()
    assert torch.equal(base.weight, before)
    assert head.mid.grad is not None and head.up.grad is not None
    assert head.down.requires_grad is False


def test_strength_scales_linearly_and_negative_works():
    head = _head()
    base = nn.Linear(16, 24).double()
    layer = BypassLinear(base, head)
    x = torch.randn(2, 16)
    full = layer(x) - base(x)
    layer.strength = -0.5
    assert torch.allclose(layer(x) - base(x), -0.5 * full, atol=1e-12)


def test_fold_is_exact_and_merge_unmerge_restores():
    head = _head()
    delta = delta_weight(head.down, head.mid, head.up, head.scale).detach()
    lora_up, lora_down = fold_to_lora(head.down, head.mid.detach(), head.up.detach(), head.scale)
    assert lora_up.shape == (24, 4) and lora_down.shape == (4, 16)
    assert (lora_up @ lora_down - delta).abs().max().item() < 1e-12
    w = torch.randn(24, 16)
    original = w.clone()
    merge_into(w, delta, 0.7)
    assert not torch.equal(w, original)
    unmerge_from(w, delta, 0.7)
    assert (w - original).abs().max().item() < 1e-12


def test_row_slices_share_parameters_and_equal_fused():
    head = _head(out_f=30)
    x = torch.randn(3, 16)
    fused = head(x)
    parts = torch.cat([head(x, slice(0, 10)), head(x, slice(10, 20)), head(x, slice(20, 30))], dim=-1)
    assert (fused - parts).abs().max().item() < 1e-12
    # gradients of the slices accumulate into the one shared Up / Mid exactly as the fused layer's do
    g = torch.randn_like(fused)
    grads_fused = torch.autograd.grad((fused * g).sum(), [head.mid, head.up])
    sliced = [head(x, slice(a, a + 10)) for a in (0, 10, 20)]
    loss = sum((s * g[:, a : a + 10]).sum() for s, a in zip(sliced, (0, 10, 20)))
    grads_sliced = torch.autograd.grad(loss, [head.mid, head.up])
    for a, b in zip(grads_fused, grads_sliced):
        assert (a - b).abs().max().item() < 1e-12


def test_head_gradients_match_finite_differences():
    head = _head(out_f=6, in_f=5, r_d=2, r_m=3)
    x = torch.randn(4, 5)

    def f(mid, up):
        return (
            torch.nn.functional.linear(
                torch.nn.functional.linear(torch.nn.functional.linear(x, head.down), mid), up
            )
            * head.scale
        )

    assert torch.autograd.gradcheck(
        f, (head.mid.detach().requires_grad_(), head.up.detach().requires_grad_())
    )
