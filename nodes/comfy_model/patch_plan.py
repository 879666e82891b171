"""Which model weights an identity patches, checked against the loaded model: free of ComfyUI imports.

ComfyUI's FLUX keeps FLUX's own (BFL) module names under ``diffusion_model.``; those are our canonical target
names, so fused layers (``img_attn.qkv``, ``single_blocks.i.linear1``) are patched whole, with no slicing.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...metalora_core.formats import IdentityAdapter, LoMD, check_identity_fits, check_lomd_fits, check_pair

PREFIX = "diffusion_model."


def weight_key(target: str) -> str:
    return f"{PREFIX}{target}.weight"


def target_shapes(state_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """``{canonical target: (out, in)}`` for every 2-D ``diffusion_model.*.weight`` of a model."""
    out = {}
    for key, shape in state_shapes.items():
        if key.startswith(PREFIX) and key.endswith(".weight") and len(shape) == 2:
            out[key[len(PREFIX) : -len(".weight")]] = (int(shape[0]), int(shape[1]))
    return out


def check_fits(
    lomd: LoMD,
    adapter: IdentityAdapter,
    shapes: Mapping[str, tuple[int, int]],
    force: bool = False,
    model_name: str = "the MODEL",
) -> None:
    """LoMD and identity belong together and every layer fits the model (message names layer and shapes)."""
    check_pair(lomd, adapter, force=force)
    check_lomd_fits(lomd, shapes, model_name)
    check_identity_fits(adapter, shapes, model_name)


def patch_tensors(
    lomd: LoMD, adapter: IdentityAdapter
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """``{weight key: (down, mid, up, scale)}``: what each weight adapter gets."""
    scale = adapter.shape.scale
    return {
        weight_key(name): (lomd.downs[name], adapter.mids[name], adapter.ups[name], scale)
        for name in adapter.targets
    }
