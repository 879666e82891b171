"""``ComfyFluxBackend`` on a real ComfyUI FLUX (tiny, float64): conventions, heads, gradients, cleanliness."""

from __future__ import annotations

import pytest
import torch

from metalora_core.adapter import AdapterShape
from metalora_core.dev.random_assets import random_adapter, random_lomd
from metalora_core.inject import make_heads
from metalora_core.training.objective import noisy_latents
from metalora_core.training.protocol import FluxBackend, TextConditioning
from tests.comfyui.train.helpers import directional_check


@pytest.fixture(scope="module")
def backend_mod(comfy, pack):
    return pack("comfy_training.backend")


@pytest.fixture(scope="module")
def base_mod(comfy, pack):
    return pack("comfy_training.base")


@pytest.fixture(scope="module")
def lomd(tiny_bfl):
    return random_lomd(tiny_bfl, AdapterShape(4, 8), "all_linear", seed=1)


def _cond(dims, tokens=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TextConditioning(
        torch.randn(tokens, dims.context_dim, generator=g, dtype=torch.float64),
        torch.randn(dims.vec_dim, generator=g, dtype=torch.float64),
    )


def _latents(batch=2, h=8, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, h, w, generator=g, dtype=torch.float64)


def _heads(backend, lomd, tiny_bfl, up_std=0.05):
    adapter = random_adapter(lomd, tiny_bfl, seed=2, up_std=up_std)
    return make_heads(backend.dims, lomd, adapter, dtype=torch.float64)


def test_is_a_flux_backend_with_the_models_sizes(flux64, backend_mod):
    backend = backend_mod.ComfyFluxBackend(flux64)
    assert isinstance(backend, FluxBackend)
    assert (backend.dims.hidden, backend.dims.depth, backend.dims.depth_single) == (128, 2, 2)
    assert backend.dims.guidance and backend.dims.vec_dim == 32 and backend.dtype == torch.float64


def test_velocity_matches_comfyuis_own_denoiser(flux64, backend_mod):
    """ComfyUI's sampling path (``apply_model`` -> x0 = x_t - sigma * out) implies the same velocity:
    timestep, guidance, pooled vector and latent layout all agree with ComfyUI's conventions."""
    backend = backend_mod.ComfyFluxBackend(flux64)
    cond = _cond(backend.dims)
    x_t, t = _latents(), torch.tensor([0.7, 0.3], dtype=torch.float64)
    with backend.session(), torch.no_grad():
        v = backend.velocity(x_t, t, cond, guidance=3.5)
        ctx, pooled = cond.batch(2, "cpu", torch.float64)
        x0 = flux64.model.apply_model(
            x_t, t, c_crossattn=ctx, y=pooled, guidance=torch.full((2,), 3.5, dtype=torch.float64)
        )
        v_guid1 = backend.velocity(x_t, t, cond, guidance=1.0)
    expected = (x_t - x0) / t.view(-1, 1, 1, 1)
    # apply_model casts the model output to float32 before forming x0, hence float32-level agreement.
    torch.testing.assert_close(v, expected, rtol=1e-6, atol=1e-6)
    assert v.shape == x_t.shape
    assert (v - v_guid1).abs().max() > 1e-4  # guidance reaches the model


def test_heads_equal_merged_weights_and_leave_no_trace(
    comfy, flux64, tiny_bfl, lomd, backend_mod, base_mod, load
):
    backend = backend_mod.ComfyFluxBackend(flux64)
    heads = _heads(backend, lomd, tiny_bfl)
    cond, x_t = _cond(backend.dims, seed=3), _latents(seed=4)
    t = torch.tensor([0.5, 0.9], dtype=torch.float64)
    options_before = repr(flux64.model_options)
    with backend.session(), torch.no_grad():
        plain = backend.velocity(x_t, t, cond, 1.0)
        with backend.adapters(heads):
            adapted = backend.velocity(x_t, t, cond, 1.0)
        after = backend.velocity(x_t, t, cond, 1.0)
    assert torch.equal(plain, after) and (adapted - plain).abs().max() > 1e-3
    assert repr(flux64.model_options) == options_before
    assert not comfy.model_management.in_training

    merged = load(tiny_bfl, torch.float64)
    base_mod.materialize_inference_tensors(merged.model)
    with torch.no_grad():
        for key, head in heads.items():
            merged.model.diffusion_model.get_submodule(key.replace("__", ".")).weight += head.delta_weight()
    other = backend_mod.ComfyFluxBackend(merged)
    with other.session(), torch.no_grad():
        reference = other.velocity(x_t, t, cond, 1.0)
    torch.testing.assert_close(adapted, reference, rtol=1e-9, atol=1e-9)


def _loss(backend, heads, x0, cond, t, noise):
    """The flow-matching loss in float64 (``flow_loss`` itself reduces in float32)."""
    with backend.adapters(heads):
        v = backend.velocity(noisy_latents(x0, noise, t), t, cond, 1.0)
    return ((v - (noise - x0)) ** 2).mean()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_matches_finite_differences(flux64, tiny_bfl, lomd, backend_mod, checkpointing):
    """Directional derivative of the flow loss along a random Mid/Up direction: autograd == central
    differences. RoPE runs in float32 inside ComfyUI even for float64 models, hence 1e-4."""
    backend = backend_mod.ComfyFluxBackend(flux64)
    backend.set_gradient_checkpointing(checkpointing)
    heads = _heads(backend, lomd, tiny_bfl)
    cond, x0, noise = _cond(backend.dims, seed=5), _latents(seed=6), _latents(seed=7)
    t = torch.tensor([0.4, 0.8], dtype=torch.float64)
    params = [p for h in heads.values() for p in (h.mid, h.up)]
    with backend.session():
        analytic, numeric = directional_check(
            lambda: _loss(backend, heads, x0, cond, t, noise), params, eps=1e-4, seed=8
        )
    assert abs(analytic) > 1e-3
    assert abs(numeric - analytic) <= 1e-4 * abs(analytic), (numeric.item(), analytic.item())


def test_not_flux_is_refused(backend_mod):
    from metalora_core.errors import MetaLoRAError

    class NotAPatcher:
        model = torch.nn.Linear(2, 2)

    with pytest.raises(MetaLoRAError, match="MODEL input"):
        backend_mod.ComfyFluxBackend(NotAPatcher())


def test_only_inference_tensors_on_the_compute_device_are_copied(base_mod):
    with torch.inference_mode():
        layer = torch.nn.Linear(3, 2)
    before = layer.weight
    assert base_mod.materialize_inference_tensors(layer, torch.device("meta")) == 0  # elsewhere: kept
    assert layer.weight is before
    assert base_mod.materialize_inference_tensors(layer, torch.device("cpu")) == 2
    assert not layer.weight.is_inference() and torch.equal(layer.weight, before)
    assert not layer.weight.requires_grad
    assert base_mod.materialize_inference_tensors(layer) == 0  # nothing left to copy
