"""Qwen-Image conventions pinned against diffusers' own ``QwenImagePipeline`` (an independent reference):
packing, the transformer call, the time shift and the VAE normalisation, by running the real pipeline on
the tiny model and watching what it hands the transformer and the VAE."""

from __future__ import annotations

import pytest
import torch

from metalora_core.dev.tiny_qwen_image import TINY_QWEN_DIMS
from metalora_core.models import FAMILIES, detect_family, family_of
from metalora_core.models.qwen_image import QWEN_IMAGE, SHIFT_RANGE, qwen_mu
from metalora_core.training.protocol import TextConditioning

# Qwen/Qwen-Image scheduler/scheduler_config.json
QWEN_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}


def _pipeline(backend, vae):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
    return QwenImagePipeline(scheduler, vae, None, None, backend.model)


def test_packing_matches_the_pipeline():
    from diffusers import QwenImagePipeline

    x = torch.randn(2, 16, 6, 10)
    packed = QWEN_IMAGE.pack(x)
    torch.testing.assert_close(packed, QwenImagePipeline._pack_latents(x, 2, 16, 6, 10), rtol=0, atol=0)
    theirs = QwenImagePipeline._unpack_latents(packed, 6 * 8, 10 * 8, 8)  # (B, C, 1, H, W), pixel sizes
    torch.testing.assert_close(QWEN_IMAGE.unpack(packed, 6, 10), theirs[:, :, 0], rtol=0, atol=0)


@pytest.mark.parametrize("tokens", [256, 1024, 4096, 8192])
def test_mu_is_the_pipelines_calculate_shift_with_qwen_images_scheduler(tokens):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    c = QWEN_SCHEDULER
    expected = calculate_shift(
        tokens, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"]
    )
    assert qwen_mu(tokens) == pytest.approx(expected, abs=1e-12)
    assert SHIFT_RANGE == (256, 8192, 0.5, 0.9)


def test_backend_calls_the_transformer_as_the_pipeline_does(qwen_backend, qwen_files):
    """Run QwenImagePipeline (two steps: one would stretch to a NaN sigma); feed the latents and time it gave the transformer to our backend:
    the transformer must see the same inputs and our velocity must be its output, unpacked."""
    from metalora_core.training.standalone import load_vae

    calls = []
    handle = qwen_backend.model.register_forward_pre_hook(
        lambda m, a, kw: calls.append({k: v for k, v in kw.items()}), with_kwargs=True
    )
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(1, 6, TINY_QWEN_DIMS.context_dim, generator=g)
    try:
        pipe = _pipeline(qwen_backend, load_vae(qwen_files["vae"]))
        with torch.no_grad():
            pipe(
                prompt_embeds=embeds,
                prompt_embeds_mask=torch.ones(1, 6, dtype=torch.long),
                height=64,
                width=48,
                num_inference_steps=2,
                true_cfg_scale=1.0,
                output_type="latent",
                generator=torch.Generator().manual_seed(0),
            )
        theirs, before = calls[0], len(calls)
        x_t = QWEN_IMAGE.unpack(theirs["hidden_states"], 8, 6)
        t = theirs["timestep"]
        with torch.no_grad():
            ours = qwen_backend.velocity(x_t, t, TextConditioning(embeds[0]), None)
        mine = calls[before]
    finally:
        handle.remove()
    torch.testing.assert_close(mine["hidden_states"], theirs["hidden_states"], rtol=0, atol=0)
    torch.testing.assert_close(mine["timestep"], theirs["timestep"], rtol=0, atol=0)
    assert [list(s) for s in mine["img_shapes"]] == [list(s) for s in theirs["img_shapes"]]
    torch.testing.assert_close(mine["encoder_hidden_states"], theirs["encoder_hidden_states"])
    with torch.no_grad():
        out = qwen_backend.model(**{**theirs, "return_dict": False})[0]
    torch.testing.assert_close(ours, QWEN_IMAGE.unpack(out, 8, 6), rtol=1e-6, atol=1e-6)


def test_vae_normalisation_is_the_pipelines(qwen_backend, qwen_files):
    """The pipeline decodes ``latents / (1 / std) + mean``: a zero-velocity transformer leaves the start
    latents as they are, so what reaches ``vae.decode`` is our ``vae_denormalize`` of them."""
    from metalora_core.training.standalone import load_vae, vae_encoder

    vae = load_vae(qwen_files["vae"])
    seen = {}
    real_decode = vae.decode

    def decode(z, *args, **kwargs):
        seen["z"] = z.clone()
        return real_decode(z, *args, **kwargs)

    vae.decode = decode
    pipe = _pipeline(qwen_backend, vae)
    start = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(1))  # packed 8x6 latents
    zero = torch.nn.Module()
    zero.forward = lambda hidden_states, **kw: (torch.zeros_like(hidden_states),)
    pipe.transformer.forward, real_forward = zero.forward, pipe.transformer.forward
    try:
        with torch.no_grad():
            pipe(
                prompt_embeds=torch.randn(1, 6, TINY_QWEN_DIMS.context_dim),
                prompt_embeds_mask=torch.ones(1, 6, dtype=torch.long),
                height=64,
                width=48,
                num_inference_steps=2,
                latents=start,
                output_type="np",
            )
    finally:
        pipe.transformer.forward = real_forward
    expected = QWEN_IMAGE.vae_denormalize(QWEN_IMAGE.unpack(start, 8, 6), vae.config)
    torch.testing.assert_close(seen["z"][:, :, 0], expected, rtol=1e-6, atol=1e-6)
    # and our encoder is the inverse: normalise(encode) then the pipeline's decode formula gives the mean back
    images = torch.rand(1, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        z = vae.encode(images.unsqueeze(2)).latent_dist.mode()[:, :, 0]
        ours = vae_encoder(vae)(images)
    torch.testing.assert_close(QWEN_IMAGE.vae_denormalize(ours, vae.config), z, rtol=1e-5, atol=1e-5)


def test_families_are_detected_from_tensor_names(qwen_files, assets):
    from metalora_core.model_files import read_model_dims

    dims, layout = read_model_dims(qwen_files["file"])
    assert family_of(dims) is QWEN_IMAGE and dims == TINY_QWEN_DIMS and layout == "diffusers"
    assert read_model_dims(qwen_files["folder"])[0] == TINY_QWEN_DIMS
    flux_dims, flux_layout = read_model_dims(assets["bfl"])
    assert family_of(flux_dims) is FAMILIES["flux"] and flux_layout == "bfl"
    assert detect_family(
        {"diffusion_model.txt_norm.weight": (48,), "diffusion_model.img_in.weight": (64, 64)}
    )
