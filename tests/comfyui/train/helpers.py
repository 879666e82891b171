"""Helpers of the in-process training tests: random heads and identities, a directional gradient check, and a
tiny ComfyUI Qwen-Image built through ComfyUI's own model config (no file; ComfyUI must already be importable,
see the ``comfy`` fixture).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from metalora_core.adapter import IdentityHead
from metalora_core.formats import IdentityAdapter
from metalora_core.inject import heads_to_adapter, make_heads

# Train Identity's settings in the tests that run it (in process and on the server): fast, and every
# option away from its default where that exercises more (checkpointing, augmentation, bucketing)
TRAIN_SETTINGS = dict(
    lr_mid=1e-3,
    lr_up=1e-3,
    rank_mid=0,
    seed=0,
    resolution=256,
    bucketing=True,
    views=2,
    augmentation=0.5,
    schedule="constant",
    warmup_steps=0,
    gradient_checkpointing=True,
)

TINY_QWEN_CONFIG = {
    "image_model": "qwen_image",
    "num_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 48,
    "axes_dims_rope": (4, 14, 14),
    "in_channels": 64,
}


def random_qwen_weights(diffusion_model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Well-scaled random weights for every tensor of a Qwen-Image transformer (norm gains near 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in diffusion_model.state_dict().items():
        x = torch.randn(t.shape, generator=g, dtype=torch.float64)
        if t.ndim == 2:
            x = x / t.shape[1] ** 0.5
        elif "norm" in name:
            x = 1 + 0.1 * x
        else:
            x = 0.1 * x
        out[name] = x.to(t.dtype)
    return out


def load_qwen(comfy, dtype: torch.dtype, seed: int = 0, **config):
    """A fresh ModelPatcher over a tiny ComfyUI Qwen-Image with random weights, made under inference mode as
    ComfyUI's loader makes models (``config`` overrides the tiny sizes, e.g. an edit variant's flags)."""
    import comfy.model_patcher
    import comfy.supported_models

    with torch.inference_mode():
        model_config = comfy.supported_models.QwenImage({**TINY_QWEN_CONFIG, **config})
        model_config.set_inference_dtype(dtype, None)
        model = model_config.get_model({})
        model.load_model_weights(random_qwen_weights(model.diffusion_model, seed))
    device = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def random_head(out_f: int, in_f: int, seed: int, up_std: float = 0.05) -> IdentityHead:
    """A float64 head with a random Down, Mid and (``up_std``-scaled) Up."""
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(4, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    mid = torch.randn(8, 4, generator=g, dtype=torch.float64)
    up = up_std * torch.randn(out_f, 8, generator=g, dtype=torch.float64)
    return IdentityHead(down, out_f, 8, scale=1.0, mid_init=mid, up_init=up)


def random_identity(lomd, dims, seed: int = 0, up_std: float = 0.05) -> IdentityAdapter:
    """An identity with random Mid and non-zero Up on every layer of ``lomd`` (in-memory sizes, no file)."""
    heads = make_heads(dims, lomd)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for h in heads.values():
            h.up.copy_(up_std * torch.randn(h.up.shape, generator=g))
    return heads_to_adapter(heads, lomd, dims, {"dev": "test"})


def directional_check(
    loss: Callable[[], torch.Tensor], params: list[torch.Tensor], eps: float, seed: int = 0
):
    """(autograd, central difference) of ``loss`` along a random direction in ``params``."""
    g = torch.Generator().manual_seed(seed)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    grads = torch.autograd.grad(loss(), params)
    analytic = sum((gr * d).sum() for gr, d in zip(grads, direction))
    values = []
    with torch.no_grad():
        for sign in (1, -1):
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            values.append(loss())
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
    return analytic, (values[0] - values[1]) / (2 * eps)
