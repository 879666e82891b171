"""Train Identity helpers on Qwen-Image sizes, without ComfyUI: conditioning, VAE latents, view encoding."""

from __future__ import annotations

import pytest
import torch

from metalora_core.dev.tiny_flux import TINY_DIMS
from metalora_core.errors import MetaLoRAError
from metalora_core.models.qwen_image import QwenImageDims

QWEN = QwenImageDims(64, 256, 2, 16, 48, 16, 32)


@pytest.fixture(scope="module")
def glue(pure):
    return pure("comfy_training.glue")


def test_qwen_conditioning_has_no_pooled_vector(glue):
    with torch.inference_mode():
        tokens = torch.randn(1, 7, 48)
    for extra in ({}, {"pooled_output": None}, {"pooled_output": torch.randn(1, 48)}):
        cond = glue.text_conditioning([[tokens, extra]], QWEN)
        assert (
            cond.pooled is None and torch.equal(cond.context, tokens[0]) and not cond.context.is_inference()
        )


def test_trailing_padding_is_trimmed_for_qwen_only(glue):
    tokens = torch.randn(1, 6, 48)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    cond = glue.text_conditioning([[tokens, {"attention_mask": mask}]], QWEN)
    assert torch.equal(cond.context, tokens[0, :4])
    flux = glue.text_conditioning([[torch.randn(1, 6, 64), {"attention_mask": mask}]], TINY_DIMS)
    assert flux.context.shape == (6, 64)  # FLUX's sampling attends to every token: so does training
    with pytest.raises(MetaLoRAError, match="inside the prompt"):
        glue.text_conditioning([[tokens, {"attention_mask": torch.tensor([[1, 0, 1, 1, 1, 1]])}]], QWEN)


@pytest.mark.parametrize(
    "dims, width, match",
    [
        (QWEN, 64, "this Qwen-Image expects 48.*CLIPLoader, type qwen_image"),
        (TINY_DIMS, 48, "this FLUX.1.*type flux"),
    ],
)
def test_wrong_text_encoder_is_named_per_family(glue, dims, width, match):
    with pytest.raises(MetaLoRAError, match=match):
        glue.text_conditioning([[torch.randn(1, 5, width), {}]], dims)


def test_vae_latents_are_checked_and_the_frame_axis_dropped(glue):
    one_frame = torch.randn(3, 16, 1, 4, 5)
    glue.check_vae_latents(one_frame, 3, QWEN)
    assert glue.image_latents(one_frame).shape == (3, 16, 4, 5)
    glue.check_vae_latents(torch.randn(3, 16, 4, 5), 2, TINY_DIMS)
    assert glue.image_latents(torch.randn(3, 16, 4, 5)).shape == (3, 16, 4, 5)
    for bad in (torch.randn(3, 16, 4, 5), torch.randn(1, 16, 2, 4, 5), torch.randn(3, 48, 1, 4, 5)):
        with pytest.raises(MetaLoRAError, match="vae input.*Qwen-Image VAE"):
            glue.check_vae_latents(bad, 3, QWEN)


def test_a_video_vae_encodes_each_view_alone(glue):
    class ClipVAE:
        """Reads a batch of images as the frames of one clip, as ComfyUI's Wan 2.1 VAE does."""

        latent_dim = 3

        def __init__(self):
            self.calls = []

        def encode(self, pixels):
            self.calls.append(pixels.shape[0])
            return pixels[:1].mean(-1, keepdim=True).expand(-1, -1, -1, 16).movedim(-1, 1).unsqueeze(2)

    vae, pixels = ClipVAE(), torch.rand(3, 8, 8, 3)
    latents = glue.encode_views(vae, pixels)
    assert vae.calls == [1, 1, 1] and latents.shape == (3, 16, 1, 8, 8)
    assert torch.equal(latents[2, 0, 0], pixels[2].mean(-1))
