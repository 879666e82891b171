"""FLUX's training conventions, each pinned against an independent reference: diffusers' own FLUX pipeline
helpers (``calculate_shift``, ``_pack_latents``, ``_unpack_latents``, ``_prepare_latent_image_ids``), the
flow-match scheduler (``time_shift``, ``scale_noise``, ``step``) and the VAE config's shift and scale.

The "loss falls" tests cannot see a wrong objective (a wrong objective falls too), so these tests never score
with the code under test: a spy backend records what the loop feeds the model, and an oracle backend that
returns the true velocity ``noise - x0`` must get loss 0.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift

from metalora_core.training.diffusers_backend import image_ids, pack_latents, unpack_latents
from metalora_core.training.objective import flow_loss, flux_mu, noisy_latents, sample_timesteps
from metalora_core.training.personalize import PersonalizeConfig, personalize
from metalora_core.training.protocol import TextConditioning

# FLUX.1-dev's scheduler config (scheduler/scheduler_config.json of the release); the pipeline reads its
# calculate_shift arguments from it.
FLUX_SCHEDULER = dict(
    base_image_seq_len=256,
    max_image_seq_len=4096,
    base_shift=0.5,
    max_shift=1.15,
    shift=3.0,
    use_dynamic_shifting=True,
    time_shift_type="exponential",
)
H, W = 6, 10  # a non-square latent: any row/column mix-up shows


def _latents(b=2, c=16, h=H, w=W, seed=0, dtype=torch.float64):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _reference_mu(h: int, w: int) -> float:
    """What FluxPipeline computes: ``calculate_shift`` of the PACKED sequence length, scheduler config args."""
    seq = FluxPipeline._pack_latents(torch.zeros(1, 16, h, w), 1, 16, h, w).shape[1]
    c = FLUX_SCHEDULER
    return calculate_shift(
        seq, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"]
    )


# --- packing, positions ------------------------------------------------------------------------------


def test_pack_and_unpack_match_the_flux_pipeline():
    x = _latents()
    b, c, h, w = x.shape
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, b, c, h, w), rtol=0, atol=0)
    tokens = torch.randn_like(packed)
    theirs = FluxPipeline._unpack_latents(tokens, h * 8, w * 8, 8)  # pipeline takes pixel sizes
    torch.testing.assert_close(unpack_latents(tokens, h, w), theirs, rtol=0, atol=0)


def test_image_ids_match_the_flux_pipeline():
    ours = image_ids(H, W, "cpu", torch.float64)
    theirs = FluxPipeline._prepare_latent_image_ids(1, H // 2, W // 2, "cpu", torch.float64)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


# --- timesteps ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [16, 256, 1024, 4096, 6000])
def test_mu_is_calculate_shift_of_the_token_count(tokens):
    assert flux_mu(tokens) == pytest.approx(calculate_shift(tokens), abs=1e-12)


@pytest.mark.parametrize("hw", [(H, W), (64, 96), (128, 128)])
def test_training_timesteps_are_the_schedulers_time_shift_of_logit_normal(hw):
    """Same draws, unshifted vs shifted: the shift must be diffusers' ``time_shift(mu, 1, t)`` with ``mu``
    of the packed token count (``(H/2) * (W/2)``, not ``H * W``)."""
    unshifted = sample_timesteps(512, hw, torch.Generator().manual_seed(3), shift=False)
    shifted = sample_timesteps(512, hw, torch.Generator().manual_seed(3), shift=True)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    expected = scheduler.time_shift(_reference_mu(*hw), 1.0, unshifted.double())
    torch.testing.assert_close(shifted.double(), expected, rtol=1e-6, atol=1e-7)
    # the unshifted draw is logit-normal(0, 1): its logit is a standard normal sample
    logit = torch.log(unshifted / (1 - unshifted))
    assert abs(float(logit.mean())) < 0.15 and abs(float(logit.std()) - 1.0) < 0.1
    assert bool((shifted > unshifted).all())  # mu > 0 at every size here: more noise, never less


# --- noise, target -----------------------------------------------------------------------------------


def test_noisy_latents_are_the_schedulers_forward_process():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)  # sigma_i = timestep_i / 1000
    picks = torch.tensor([100, 437, 900])
    timesteps = scheduler.timesteps[picks]
    sigmas = scheduler.sigmas[picks].double()
    x0, noise = _latents(3), _latents(3, seed=1)
    theirs = scheduler.scale_noise(x0, timesteps, noise)
    torch.testing.assert_close(noisy_latents(x0, noise, sigmas), theirs, rtol=1e-12, atol=1e-12)


def test_the_target_velocity_moves_the_sampler_along_the_forward_process():
    """One Euler step of diffusers' sampler with velocity ``noise - x0`` from ``x_t`` lands on ``x_s``:
    the sign and the direction of the target are the ones FLUX samples with."""
    scheduler = FlowMatchEulerDiscreteScheduler(**{**FLUX_SCHEDULER, "use_dynamic_shifting": False})
    scheduler.set_timesteps(8)
    x0, noise = _latents(1), _latents(1, seed=1)
    i = 3
    sigma, sigma_next = scheduler.sigmas[i].double(), scheduler.sigmas[i + 1].double()
    x_t = noisy_latents(x0, noise, sigma.reshape(1))
    scheduler.set_begin_index(i)
    stepped = scheduler.step(noise - x0, scheduler.timesteps[i], x_t, return_dict=False)[0]
    torch.testing.assert_close(stepped, noisy_latents(x0, noise, sigma_next.reshape(1)), rtol=0, atol=1e-6)


class _Spy:
    """A backend that records what it is called with and answers ``answer(x_t, t)`` (float64)."""

    def __init__(self, answer, dims=None):
        from metalora_core.dev.tiny_flux import TINY_DIMS

        self.answer, self.calls, self.heads = answer, [], None
        self.dims, self.device, self.dtype = dims or TINY_DIMS, torch.device("cpu"), torch.float32

    def velocity(self, x_t, t, cond, guidance):
        self.calls.append({"x_t": x_t.detach().clone(), "t": t.detach().clone(), "guidance": guidance})
        out = self.answer(x_t.double(), t.double().view(-1, 1, 1, 1)).to(x_t.dtype)
        if self.heads is not None:  # depend on the trainable weights, so backward has something to do
            out = out + 0.0 * sum(p.sum() for p in self.heads.parameters() if p.requires_grad)
        return out

    @contextmanager
    def adapters(self, heads):
        self.heads = heads
        try:
            yield
        finally:
            self.heads = None

    def set_gradient_checkpointing(self, enabled):
        pass


def test_flow_loss_feeds_x_t_and_scores_against_noise_minus_x0():
    x0, noise = _latents(2).float(), _latents(2, seed=1).float()
    t = torch.tensor([0.3, 0.8])
    cond = TextConditioning(torch.zeros(4, 64))
    oracle = _Spy(lambda x_t, tt: (noise - x0).double())
    assert float(flow_loss(oracle, x0, cond, t, noise)) == 0.0
    expected_x_t = (1 - t.double().view(-1, 1, 1, 1)) * x0.double() + t.double().view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(oracle.calls[0]["x_t"].double(), expected_x_t, rtol=0, atol=1e-6)
    torch.testing.assert_close(oracle.calls[0]["t"], t, rtol=0, atol=0)
    zero = _Spy(lambda x_t, tt: torch.zeros_like(x_t))
    expected = float(((noise.double() - x0.double()) ** 2).mean())
    assert float(flow_loss(zero, x0, cond, t, noise)) == pytest.approx(expected, rel=1e-6)


def test_weighted_flow_loss_is_the_mask_weighted_mean_over_every_channel():
    x0, noise = _latents(2).float(), _latents(2, seed=1).float()
    t = torch.tensor([0.3, 0.8])
    mask = torch.rand(2, 1, H, W, generator=torch.Generator().manual_seed(4))
    zero = _Spy(lambda x_t, tt: torch.zeros_like(x_t))
    got = float(flow_loss(zero, x0, TextConditioning(torch.zeros(4, 64)), t, noise, weight=mask))
    err = (noise.double() - x0.double()) ** 2
    expected = float((err * mask.double()).sum() / (mask.double().sum() * err.shape[1]))
    assert got == pytest.approx(expected, rel=1e-6)


# --- the personalization loop, seen from the model's side --------------------------------------------


@pytest.fixture(scope="module")
def one_view():
    return torch.randn(16, H, W, generator=torch.Generator().manual_seed(8))


def test_the_loop_feeds_true_noisy_latents_times_and_the_configured_guidance(lomd, one_view):
    """An oracle that knows the view answers the true velocity ``(x_t - x0) / t``: the loss must be 0.
    A reversed ``x_t``, a flipped target or a wrong timestep pairing all make it large."""
    x0 = one_view.double()
    spy = _Spy(lambda x_t, t: (x_t - x0) / t)
    cond = TextConditioning(torch.zeros(4, 64), torch.zeros(32))
    cfg = PersonalizeConfig(steps=4, batch_size=2, guidance=2.25, lr=1e-3, warmup_steps=0, seed=5)
    result = personalize(spy, lomd, [one_view], cond, cfg)
    assert max(result.losses) < 1e-9, result.losses
    assert len(spy.calls) == 4 and all(c["guidance"] == 2.25 for c in spy.calls)
    # the times the model sees are FLUX-shifted logit-normal draws for this latent size
    for c in spy.calls:
        assert c["t"].shape == (2,) and bool(((c["t"] > 0) & (c["t"] < 1)).all())
    default = _Spy(lambda x_t, t: (x_t - x0) / t)
    personalize(default, lomd, [one_view], cond, PersonalizeConfig(steps=1, warmup_steps=0))
    assert default.calls[0]["guidance"] == 1.0  # FLUX.1-dev trains with its guidance embedder at 1.0


def test_the_loop_draws_its_times_with_the_flux_shift_of_the_view_size(lomd, one_view):
    """The loop's first draw, reproduced from its seed: index, then the shifted logit-normal times."""
    spy = _Spy(lambda x_t, t: torch.zeros_like(x_t))
    cond = TextConditioning(torch.zeros(4, 64), torch.zeros(32))
    personalize(spy, lomd, [one_view], cond, PersonalizeConfig(steps=1, batch_size=3, seed=11))
    g = torch.Generator().manual_seed(11)
    torch.randint(1, (3,), generator=g)
    u = torch.sigmoid(torch.randn(3, generator=g)).clamp(1e-4, 1 - 1e-4).double()
    expected = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER).time_shift(_reference_mu(H, W), 1.0, u)
    torch.testing.assert_close(spy.calls[0]["t"].double(), expected, rtol=1e-6, atol=1e-7)


# --- the diffusers backend, seen from the transformer's side ------------------------------------------


def test_diffusers_backend_calls_the_transformer_as_the_flux_pipeline_does(backend):
    """Packed tokens, RoPE ids, ``t`` (not ``1000 t``), the guidance asked for, zero text ids; the output
    unpacked with the pipeline's own ``_unpack_latents``."""
    seen = {}

    def record(module, args, kwargs):
        seen.update(kwargs)

    handle = backend.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        x_t = _latents(2, dtype=torch.float32)
        t = torch.tensor([0.25, 0.75])
        g = torch.Generator().manual_seed(2)
        cond = TextConditioning(torch.randn(5, 64, generator=g), torch.randn(32, generator=g))
        with torch.no_grad():
            out = backend.velocity(x_t, t, cond, 2.5)
            direct = backend.model(**seen)[0]
    finally:
        handle.remove()
    b, c, h, w = x_t.shape
    torch.testing.assert_close(seen["hidden_states"], FluxPipeline._pack_latents(x_t, b, c, h, w))
    torch.testing.assert_close(
        seen["img_ids"], FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    )
    torch.testing.assert_close(seen["timestep"], t)  # the pipeline passes timestep / 1000 = sigma
    torch.testing.assert_close(seen["guidance"], torch.full((2,), 2.5))
    assert torch.count_nonzero(seen["txt_ids"]) == 0 and seen["txt_ids"].shape == (5, 3)
    torch.testing.assert_close(seen["encoder_hidden_states"], cond.context.expand(2, -1, -1))
    torch.testing.assert_close(seen["pooled_projections"], cond.pooled.expand(2, -1))
    torch.testing.assert_close(out, FluxPipeline._unpack_latents(direct, h * 8, w * 8, 8), rtol=0, atol=0)


# --- the VAE ------------------------------------------------------------------------------------------


def test_vae_latents_are_shifted_then_scaled_by_the_configs_factors():
    """FLUX pipelines encode ``(mean - shift_factor) * scaling_factor`` and decode the inverse; FLUX.1's VAE
    config has 0.1159 and 0.3611 (ComfyUI's ``latent_formats.Flux`` uses the same two numbers)."""
    from metalora_core.dev.tiny_vae import tiny_vae
    from metalora_core.training.standalone import vae_encoder

    vae = tiny_vae(0)
    assert (vae.config.shift_factor, vae.config.scaling_factor) == (0.1159, 0.3611)
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        got = vae_encoder(vae)(images)
        mean = vae.encode(images).latent_dist.mode()
    torch.testing.assert_close(got, (mean - 0.1159) * 0.3611, rtol=0, atol=1e-6)
    torch.testing.assert_close(got / 0.3611 + 0.1159, mean, rtol=0, atol=1e-5)  # the pipeline's decode side
