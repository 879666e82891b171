"""The fused bypass (``addmm`` into the layer output) equals the plain sum, values and gradients; the pieces of
a fused layer share one low-rank product; a bf16 layer runs its bypass in bf16 with float32 weights."""

from __future__ import annotations

import copy

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


def _split_layer(g: torch.Generator, dtype=torch.float64):
    """A fused 12-row layer cut into q/k/v-like pieces of 4 rows, each a BypassLinear on one head."""
    fused = torch.nn.Linear(6, 12, dtype=dtype)
    head = IdentityHead(torch.randn(3, 6, generator=g, dtype=torch.float64), 12, 5, scale=0.5)
    with torch.no_grad():
        head.up.normal_(0, 1.0, generator=g)
    pieces = []
    for start in (0, 4, 8):
        part = torch.nn.Linear(6, 4, dtype=dtype)
        with torch.no_grad():
            part.weight.copy_(fused.weight[start : start + 4])
            part.bias.copy_(fused.bias[start : start + 4])
        pieces.append(BypassLinear(part, head, slice(start, start + 4)))
    return fused, head, pieces


def test_pieces_of_a_fused_layer_share_one_low_rank_product(monkeypatch):
    g = torch.Generator().manual_seed(1)
    fused, head, pieces = _split_layer(g)
    calls = []
    real = head._down_in
    monkeypatch.setattr(head, "_down_in", lambda dtype: calls.append(dtype) or real(dtype))
    x = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    out = torch.cat([p(x) for p in pieces], dim=-1)
    assert len(calls) == 1  # Down x and Mid (Down x) once for q, k and v together
    reference = fused(x) + head(x)  # the canonical fused adapter on the fused layer
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out * weights).sum(), (x, head.mid, head.up))
    want = torch.autograd.grad((reference * weights).sum(), (x, head.mid, head.up))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    y = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)  # a new input: a new product
    pieces[0](y)
    assert len(calls) == 2


def test_a_changed_input_or_weight_is_never_served_a_stale_product():
    g = torch.Generator().manual_seed(2)
    fused, head, pieces = _split_layer(g)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    first = pieces[0](x)
    with torch.no_grad():
        x.add_(1.0)  # in place: same tensor object, new version
    torch.testing.assert_close(pieces[1](x), fused(x)[:, 4:8] + head(x, slice(4, 8)), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        head.mid.mul_(2.0)  # an optimizer step between forwards
    torch.testing.assert_close(pieces[2](x), fused(x)[:, 8:] + head(x, slice(8, 12)), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        again = pieces[0](x - 1.0)
    assert not torch.allclose(again, first)  # (mid doubled) and no product computed with grad reused


def test_bf16_layer_runs_the_bypass_in_bf16_with_float32_weights():
    g = torch.Generator().manual_seed(3)
    base = torch.nn.Linear(8, 4).to(torch.bfloat16)
    head = IdentityHead(torch.randn(2, 8, generator=g), 4, 3, scale=1.0)
    with torch.no_grad():
        head.up.normal_(0, 0.3, generator=g)
    x = torch.randn(3, 8, generator=g, dtype=torch.bfloat16, requires_grad=True)
    out = BypassLinear(base, head)(x)
    assert out.dtype == torch.bfloat16
    exact = copy.deepcopy(base).double()(x.double()) + copy.deepcopy(head).double()(x.double())
    torch.testing.assert_close(out.double(), exact, rtol=2e-2, atol=2e-2)  # bf16 rounding only
    out.float().sum().backward()
    assert head.mid.grad.dtype == head.up.grad.dtype == torch.float32  # master weights stay float32
    assert head.mid.grad.abs().sum() > 0 and x.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert BypassLinear(torch.nn.Linear(8, 4), head)(torch.randn(3, 8)).dtype == torch.bfloat16


def test_no_product_outlives_the_forward_under_checkpointing(backend, lomd, views, cond):
    """The shared product is dropped once the last piece has read it: one kept past the forward would pin
    a checkpoint recompute's graph and every activation in it (the memory checkpointing exists to save)."""
    from metalora_core.inject import make_heads
    from metalora_core.training.objective import flow_loss

    heads = make_heads(backend.dims, lomd)
    x0 = views[0].unsqueeze(0)
    backend.set_gradient_checkpointing(True)
    try:
        with backend.adapters(heads):
            flow_loss(backend, x0, cond, torch.tensor([0.5]), torch.randn(x0.shape)).backward()
            assert [k for k, h in heads.items() if h._memo is not None] == []
    finally:
        backend.set_gradient_checkpointing(False)
    split = [k for k, h in heads.items() if len(h._pieces) > 1]
    assert split, "no head with several pieces: the check would be vacuous"
