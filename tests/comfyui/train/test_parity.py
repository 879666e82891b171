"""The in-ComfyUI trainer and the standalone trainer (DiffusersBackend) on the SAME BFL weights.

Both load tests' tiny BFL FLUX in float64 (ComfyUI through its own loader, diffusers through our BFL ->
diffusers conversion) and must agree on sizes, velocities, Mid/Up gradients and the first training steps,
so the two paths cannot drift apart. Tolerances are float32-level because both run RoPE in float32 (each in
its own arithmetic) even in float64 models.
"""

from __future__ import annotations

import pytest
import torch

from metalora_core.adapter import AdapterShape
from metalora_core.dev.random_assets import random_adapter, random_lomd
from metalora_core.inject import make_heads
from metalora_core.training.diffusers_backend import DiffusersBackend
from metalora_core.training.objective import flow_loss
from metalora_core.training.personalize import PersonalizeConfig, personalize
from metalora_core.training.protocol import TextConditioning


@pytest.fixture(scope="module")
def backends(comfy, pack, flux64, tiny_bfl):
    comfy_backend = pack("comfy_training.backend").ComfyFluxBackend(flux64)
    standalone = DiffusersBackend.from_path(tiny_bfl, dtype=torch.float64)
    with comfy_backend.session():
        yield comfy_backend, standalone


@pytest.fixture(scope="module")
def lomd(tiny_bfl):
    return random_lomd(tiny_bfl, AdapterShape(4, 8), "attn_mlp", seed=11)


def _data(dims, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = TextConditioning(
        torch.randn(8, dims.context_dim, generator=g, dtype=torch.float64),
        torch.randn(dims.vec_dim, generator=g, dtype=torch.float64),
    )
    x0 = torch.randn(2, 16, 8, 6, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 16, 8, 6, generator=g, dtype=torch.float64)
    return cond, x0, noise


def test_same_sizes(backends):
    comfy_backend, standalone = backends
    assert comfy_backend.dims == standalone.dims


def test_same_velocity(backends):
    comfy_backend, standalone = backends
    cond, x0, _ = _data(comfy_backend.dims)
    t = torch.tensor([0.25, 0.75], dtype=torch.float64)
    with torch.no_grad():
        for guidance in (1.0, 3.5):
            a = comfy_backend.velocity(x0, t, cond, guidance)
            b = standalone.velocity(x0, t, cond, guidance)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_same_mid_up_gradients(backends, lomd, tiny_bfl, checkpointing):
    comfy_backend, standalone = backends
    cond, x0, noise = _data(comfy_backend.dims, seed=1)
    t = torch.tensor([0.3, 0.9], dtype=torch.float64)
    adapter = random_adapter(lomd, tiny_bfl, seed=12, up_std=0.05)
    grads = []
    for backend in (comfy_backend, standalone):
        heads = make_heads(backend.dims, lomd, adapter, dtype=torch.float64)
        backend.set_gradient_checkpointing(checkpointing)
        try:
            with backend.adapters(heads):  # backward inside: checkpoints recompute with the heads on
                flow_loss(backend, x0, cond, t, noise, guidance=1.0).backward()
        finally:
            backend.set_gradient_checkpointing(False)
        grads.append({k: (h.mid.grad, h.up.grad) for k, h in heads.items()})
    total = sum(float(g.norm() ** 2) for pair in grads[1].values() for g in pair) ** 0.5
    assert total > 1e-3
    for key, (mid_d, up_d) in grads[1].items():
        mid_c, up_c = grads[0][key]
        # per layer, relative to the whole gradient: 1e-5 (float32 RoPE on both sides)
        assert (mid_c - mid_d).norm() <= 1e-5 * total, key
        assert (up_c - up_d).norm() <= 1e-5 * total, key


def test_same_first_training_steps(backends, lomd):
    """personalize() itself, 3 steps with the same seed: same losses, same learning rates, same adapter."""
    comfy_backend, standalone = backends
    cond, x0, _ = _data(comfy_backend.dims, seed=2)
    views = list(x0)
    config = PersonalizeConfig(steps=3, lr=1e-3, warmup_steps=0, seed=5)
    a = personalize(comfy_backend, lomd, views, cond, config)
    b = personalize(standalone, lomd, views, cond, config)
    assert a.lrs == b.lrs
    torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-5, atol=0)
    for name in b.adapter.targets:
        torch.testing.assert_close(a.adapter.mids[name], b.adapter.mids[name], rtol=0, atol=1e-4)
        torch.testing.assert_close(a.adapter.ups[name], b.adapter.ups[name], rtol=0, atol=1e-4)
    assert max(float(u.abs().max()) for u in a.adapter.ups.values()) > 1e-4  # training moved Up off zero
