"""The fused bypass (``addmm`` into the layer output) equals the plain sum, values and gradients."""

from __future__ import annotations

import pytest
import torch

from metalora_core.adapter import BypassLinear, IdentityHead


@pytest.mark.parametrize("rows", [None, slice(2, 7)])
def test_fused_bypass_equals_plain_sum(rows):
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(6, 9 if rows is None else 5, dtype=torch.float64)
    head = IdentityHead(torch.randn(3, 6, generator=g, dtype=torch.float64), 9, 4, scale=0.7)
    with torch.no_grad():
        head.up.normal_(0, 1.0, generator=g)
    layer = BypassLinear(base, head, rows)
    layer.strength = 1.3
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    fused = layer(x)
    plain = base(x) + head(x, rows, 1.3)
    assert torch.allclose(fused, plain, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(fused.square().sum(), (x, head.mid, head.up))
    expect = torch.autograd.grad(plain.square().sum(), (x, head.mid, head.up))
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(grads, expect))
    layer.strength = 0.0
    assert torch.equal(layer(x), base(x))


def test_mixed_dtype_and_autocast_fall_back():
    base = torch.nn.Linear(8, 4).to(torch.bfloat16)
    head = IdentityHead(torch.randn(2, 8), 4, 3, scale=1.0)
    with torch.no_grad():
        head.up.fill_(0.1)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = BypassLinear(base, head)(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), (base(x) + head(x).to(torch.bfloat16)).float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert BypassLinear(torch.nn.Linear(8, 4), head)(torch.randn(3, 8)).dtype == torch.bfloat16
