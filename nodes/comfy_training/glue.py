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
from ...metalora_core.targets import FluxDims
from ...metalora_core.training.data import AugmentConfig, crop_window, face_loss_weights, make_views
from ...metalora_core.training.protocol import Progress, TextConditioning

PROGRESS_EVENT = "metalora.train_progress"


def text_conditioning(positive: object, dims: FluxDims | None = None) -> TextConditioning:
    """The prompt of a ComfyUI CONDITIONING (``[[tokens (1, T, D), {"pooled_output": (1, V), ...}]]``).

    Tensors are cloned: ComfyUI creates them under inference mode and autograd cannot use those. Any
    ``guidance`` FluxGuidance put there is for sampling; training feeds FLUX.1-dev's embedder 1.0.
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
    if dims is not None and tokens.shape[-1] != dims.context_dim:
        raise MetaLoRAError(
            f"positive input: text features are {tokens.shape[-1]} wide, this FLUX expects {dims.context_dim}; "
            "encode the prompt with the FLUX text encoders (DualCLIPLoader, type flux)"
        )
    pooled = extra.get("pooled_output")
    if pooled is not None:
        pooled = pooled.reshape(-1).clone()
        if dims is not None and dims.vec_dim and pooled.shape[0] != dims.vec_dim:
            raise MetaLoRAError(
                f"positive input: pooled CLIP vector is {pooled.shape[0]} wide, this FLUX expects {dims.vec_dim}"
            )
    return TextConditioning(tokens[0].clone(), pooled)


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
