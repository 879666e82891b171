"""Pure helpers of the Train Identity node (no ComfyUI import, unit-tested under plain pytest).

ComfyUI's CONDITIONING -> the trainer's ``TextConditioning``, the LOSS_MAP ComfyUI's own "Plot Loss Graph"
node reads, and the ``metalora.train_progress`` event payload. (The activation memory to reserve when
ComfyUI loads the model for training is ``metalora_core.training.memory.activation_bytes``, which the
standalone trainer uses too.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ...metalora_core.errors import MetaLoRAError
from ...metalora_core.models import family_of
from ...metalora_core.models.family import ModelDims
from ...metalora_core.training.data import AugmentConfig, crop_window, face_loss_weights, make_views
from ...metalora_core.training.protocol import Progress, TextConditioning

PROGRESS_EVENT = "metalora.train_progress"


def text_conditioning(positive: object, dims: ModelDims | None = None) -> TextConditioning:
    """The prompt of a ComfyUI CONDITIONING (``[[tokens (1, T, D), {"pooled_output": (1, V), ...}]]``).

    Tensors are cloned: ComfyUI creates them under inference mode and autograd cannot use those. Any
    ``guidance`` FluxGuidance put there is for sampling; training feeds FLUX.1-dev's embedder 1.0. A family
    without a pooled vector (Qwen-Image) ignores one. The trainer attends to every token (no padding mask):
    where sampling honours an ``attention_mask`` (Qwen-Image), the trailing padding it hides is trimmed
    instead, which is the same attention.
    """
    if not isinstance(positive, (list, tuple)) or not positive:
        raise MetaLoRAError("positive input: expected a CONDITIONING from CLIP Text Encode")
    if len(positive) != 1:
        raise MetaLoRAError(
            f"positive input: {len(positive)} conditionings are combined here; train on ONE prompt "
            "(a single CLIP Text Encode holding the trigger word)"
        )
    entry = positive[0]
    if not isinstance(entry, (list, tuple)) or len(entry) < 2 or not torch.is_tensor(entry[0]):
        raise MetaLoRAError("positive input: not a ComfyUI CONDITIONING ([tensor, dict] entries)")
    tokens, extra = entry[0], entry[1] if isinstance(entry[1], dict) else {}
    if tokens.ndim != 3 or tokens.shape[0] != 1:
        raise MetaLoRAError(
            f"positive input: expected text features (1, tokens, dim), got {tuple(tokens.shape)}"
        )
    family = family_of(dims) if dims is not None else None
    if dims is not None and tokens.shape[-1] != dims.context_dim:
        raise MetaLoRAError(
            f"positive input: text features are {tokens.shape[-1]} wide, this {family.label} expects "
            f"{dims.context_dim}; encode the prompt with {family.comfy_text_encoder}"
        )
    masked = family is not None and family.comfy_masks_text
    context = _unpadded(tokens[0], extra.get("attention_mask")) if masked else tokens[0]
    pooled = extra.get("pooled_output")
    if pooled is not None and dims is not None and not dims.vec_dim:
        pooled = None  # no pooled input in this family
    if pooled is not None:
        pooled = pooled.reshape(-1).clone()
        if dims is not None and pooled.shape[0] != dims.vec_dim:
            raise MetaLoRAError(
                f"positive input: pooled CLIP vector is {pooled.shape[0]} wide, this {family.label} "
                f"expects {dims.vec_dim}"
            )
    return TextConditioning(context.clone(), pooled)


def _unpadded(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``tokens`` without the trailing padding an attention mask hides (a mask with holes is refused)."""
    if mask is None:
        return tokens
    keep = mask.reshape(-1).bool()
    if keep.shape[0] != tokens.shape[0]:
        raise MetaLoRAError(
            f"positive input: attention mask has {keep.shape[0]} entries for {tokens.shape[0]} tokens"
        )
    n = int(keep.sum())
    if not keep[:n].all():
        raise MetaLoRAError(
            "positive input: the attention mask hides tokens inside the prompt; train on a plain "
            "CLIP Text Encode (only trailing padding can be left out)"
        )
    return tokens[:n]


def check_vae_latents(latents: torch.Tensor, latent_dimensions: int, dims: ModelDims) -> None:
    """The VAE's latents are the model's kind: ``(N, C, H, W)`` or, for a model with video latents
    (Qwen-Image's Wan 2.1 VAE), ``(N, C, 1, H, W)``, with the model's latent channels."""
    family = family_of(dims)
    shape = tuple(latents.shape)
    frames_ok = latent_dimensions == 2 or (latents.ndim == 5 and shape[2] == 1)
    if latents.ndim != 2 + latent_dimensions or shape[1] != dims.in_channels or not frames_ok:
        raise MetaLoRAError(
            f"vae input: this VAE encodes an image as latents of shape {shape}; {family.label} needs "
            f"{dims.in_channels}-channel {'single-frame video ' if latent_dimensions == 3 else ''}latents: "
            f"connect {family.comfy_vae}"
        )


def image_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` for the trainer: the single frame axis of video-VAE latents removed."""
    return latents.squeeze(2) if latents.ndim == 5 else latents


def encode_views(vae: object, pixels: torch.Tensor) -> torch.Tensor:
    """``vae.encode`` of each view. A video VAE (``latent_dim`` 3: Qwen-Image's Wan 2.1) reads a batch of
    images as the frames of ONE clip, so there each view is encoded alone (one frame each)."""
    if getattr(vae, "latent_dim", 2) == 3:
        return torch.cat([vae.encode(pixels[i : i + 1]) for i in range(pixels.shape[0])])
    return vae.encode(pixels)


def loss_map(losses: Sequence[float]) -> dict[str, list[float]]:
    """LOSS_MAP as ComfyUI's TrainLoraNode returns it and its LossGraphNode reads it."""
    return {"loss": [float(v) for v in losses]}


def progress_event(node_id: str | None, progress: Progress) -> dict[str, object]:
    """Payload of ``metalora.train_progress`` (TEAM contract: node, step, total, loss, lr, eta_s)."""
    return {
        "node": node_id,
        "step": int(progress.step),
        "total": int(progress.total),
        "loss": float(progress.loss),
        "lr": float(progress.lr),
        "eta_s": float(progress.eta_s),
    }


def eta_text(seconds: float) -> str:
    """``1m 05s`` style remaining time for logs."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def square_crop(
    photo: np.ndarray, face_box: tuple[float, float, float, float] | None = None
) -> tuple[np.ndarray, tuple | None]:
    """The largest square of ``photo`` (centred on the face if given), for training without buckets."""
    h, w = photo.shape[:2]
    side = min(h, w)
    x, y, _, _ = crop_window(w, h, 1.0, 1.0, face_box, None)
    x0, y0 = int(round(x)), int(round(y))  # round the corner only: the side stays exactly min(h, w)
    if face_box is None:
        return photo[y0 : y0 + side, x0 : x0 + side], None
    box = (face_box[0] - x0, face_box[1] - y0, face_box[2] - x0, face_box[3] - y0)
    return photo[y0 : y0 + side, x0 : x0 + side], box


def training_views(
    photo: np.ndarray,
    n: int,
    resolution: int,
    bucketing: bool,
    strength: float,
    seed: int,
    face_box: tuple[float, float, float, float] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """``n`` augmented views of ``photo`` as a ComfyUI IMAGE batch ``(N, H, W, 3)`` in [0, 1] (what
    ``VAE.encode`` takes), plus per-view latent loss masks when a face box is given."""
    if not bucketing:
        photo, face_box = square_crop(photo, face_box)
    views = make_views(photo, n, resolution, face_box, seed, AugmentConfig(strength=strength))
    pixels = torch.from_numpy(np.stack(views.images)).float() / 255.0
    return pixels, face_loss_weights(views)
