"""Train Identity node helpers that need no ComfyUI: conditioning, loss map, progress events, memory."""

from __future__ import annotations

import pytest
import torch

from metalora_core.dev.tiny_flux import TINY_DIMS
from metalora_core.errors import MetaLoRAError
from metalora_core.training.protocol import Progress


@pytest.fixture(scope="module")
def glue(pure):
    return pure("comfy_training.glue")


def _conditioning(tokens=5, width=64, pooled=32, **extra):
    with torch.inference_mode():  # as ComfyUI's CLIPTextEncode makes them
        t = torch.randn(1, tokens, width)
        p = torch.randn(1, pooled)
    return [[t, {"pooled_output": p, **extra}]]


def test_conditioning_becomes_text_conditioning(glue):
    positive = _conditioning(guidance=3.5)
    cond = glue.text_conditioning(positive, TINY_DIMS)
    assert torch.equal(cond.context, positive[0][0][0]) and torch.equal(
        cond.pooled, positive[0][1]["pooled_output"][0]
    )
    assert not cond.context.is_inference() and not cond.pooled.is_inference()  # usable by autograd
    x = torch.ones(2, 64, requires_grad=True)
    (cond.batch(2, "cpu", torch.float32)[0] @ x.T).sum().backward()  # would raise on inference tensors


def test_conditioning_without_pooled_vector(glue):
    cond = glue.text_conditioning([[torch.randn(1, 3, 64), {}]], TINY_DIMS)
    assert cond.pooled is None and cond.context.shape == (3, 64)


@pytest.mark.parametrize(
    "positive, match",
    [
        (None, "CLIP Text Encode"),
        ([], "CLIP Text Encode"),
        (_conditioning() + _conditioning(), "ONE prompt"),
        ([["text", {}]], "not a ComfyUI CONDITIONING"),
        ([[torch.randn(5, 64), {}]], r"\(1, tokens, dim\)"),
        (_conditioning(width=4096), "DualCLIPLoader"),
        (_conditioning(pooled=768), "pooled CLIP vector is 768"),
    ],
)
def test_bad_conditioning_is_named(glue, positive, match):
    with pytest.raises(MetaLoRAError, match=match):
        glue.text_conditioning(positive, TINY_DIMS)


def test_loss_map_is_what_comfyuis_loss_graph_reads(glue):
    assert glue.loss_map([torch.tensor(0.5).item(), 0.25]) == {"loss": [0.5, 0.25]}


def test_progress_event_has_the_contract_fields(glue):
    event = glue.progress_event("7", Progress(3, 10, 0.125, 4e-4, 12.5))
    assert event == {"node": "7", "step": 3, "total": 10, "loss": 0.125, "lr": 4e-4, "eta_s": 12.5}


def test_activation_memory_grows_with_size_and_checkpointing_saves():
    from metalora_core.training.memory import activation_bytes

    small = activation_bytes(TINY_DIMS, (64, 64), 512)
    large = activation_bytes(TINY_DIMS, (128, 128), 512)
    full = activation_bytes(TINY_DIMS, (64, 64), 512, checkpointing=False)
    assert 0 < small < large and small < full
    assert activation_bytes(TINY_DIMS, (64, 64), 512, batch=2) > small
    assert activation_bytes(TINY_DIMS, (64, 64), 512, dtype=torch.float32) > small


def test_eta_text(glue):
    assert glue.eta_text(65) == "1m 05s" and glue.eta_text(9.4) == "9s" and glue.eta_text(float("inf")) == "?"


def _photo(h=300, w=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()


def test_training_views_are_an_image_batch_at_the_photos_bucket(glue):
    pixels, weights = glue.training_views(_photo(), 3, 256, True, 0.5, seed=1)
    assert pixels.shape[0] == 3 and pixels.shape[-1] == 3 and pixels.dtype == torch.float32
    assert pixels.shape[1] > pixels.shape[2]  # portrait photo -> portrait bucket
    assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0 and weights is None
    again, _ = glue.training_views(_photo(), 3, 256, True, 0.5, seed=1)
    assert torch.equal(pixels, again)


def test_training_views_without_bucketing_are_square_with_face_masks(glue):
    pixels, weights = glue.training_views(_photo(), 2, 256, False, 0.0, seed=0, face_box=(60, 200, 140, 280))
    assert pixels.shape[1] == pixels.shape[2] == 256
    assert weights is not None and len(weights) == 2 and weights[0].shape == (1, 32, 32)
    assert float(weights[0].max()) > float(weights[0].min())  # the face region weighs more


def test_square_crop_keeps_the_face(glue):
    crop, box = glue.square_crop(_photo(300, 200), (60, 240, 140, 290))
    assert crop.shape[:2] == (200, 200)
    assert 0 <= box[1] and box[3] <= 200 and box[0] == 60  # shifted down to hold the face, x unchanged
