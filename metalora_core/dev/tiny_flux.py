"""A tiny but complete FLUX.1 transformer checkpoint that real ComfyUI and diffusers load.

Every key of FLUX.1-dev is present; the width is a multiple of 128 (ComfyUI derives ``heads = hidden / 128``
from the tensors), so ComfyUI's model detection and diffusers' model both accept it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..model_files import save_diffusers_config
from ..safeio import save_tensors
from ..targets import FluxDims, bfl_to_diffusers, resolve_targets

TINY_DIMS = FluxDims(
    hidden=128,
    mlp_hidden=512,
    depth=2,
    depth_single=2,
    in_channels=16,
    context_dim=64,
    vec_dim=32,
    guidance=True,
    out_channels=16,
)


def tiny_dims(
    hidden: int = 128,
    depth: int = 2,
    depth_single: int = 2,
    context_dim: int = 64,
    vec_dim: int = 32,
    guidance: bool = True,
) -> FluxDims:
    if hidden % 128:
        raise ValueError(f"hidden must be a multiple of 128 (FLUX heads are 128 wide), got {hidden}")
    return FluxDims(hidden, 4 * hidden, depth, depth_single, 16, context_dim, vec_dim, guidance, 16)


def bfl_weight_shapes(dims: FluxDims) -> dict[str, tuple[int, int]]:
    """Every 2-D weight of a BFL FLUX checkpoint of these sizes (each also has a bias)."""
    h = dims.hidden
    shapes: dict[str, tuple[int, int]] = {
        "img_in.weight": (h, dims.in_channels * 4),
        "txt_in.weight": (h, dims.context_dim),
        "time_in.in_layer.weight": (h, 256),
        "time_in.out_layer.weight": (h, h),
        "final_layer.linear.weight": (dims.out_channels * 4, h),
        "final_layer.adaLN_modulation.1.weight": (2 * h, h),
    }
    if dims.vec_dim:
        shapes["vector_in.in_layer.weight"] = (h, dims.vec_dim)
        shapes["vector_in.out_layer.weight"] = (h, h)
    if dims.guidance:
        shapes["guidance_in.in_layer.weight"] = (h, 256)
        shapes["guidance_in.out_layer.weight"] = (h, h)
    for target in resolve_targets(dims, "all_linear"):
        shapes[f"{target.name}.weight"] = (target.out_features, target.in_features)
    return shapes


def bfl_norm_keys(dims: FluxDims) -> list[str]:
    """The RMSNorm scales (``head_dim`` ones each) of a BFL FLUX checkpoint."""
    keys = [
        f"double_blocks.{i}.{stream}_attn.norm.{norm}.scale"
        for i in range(dims.depth)
        for stream in ("img", "txt")
        for norm in ("query_norm", "key_norm")
    ]
    keys += [
        f"single_blocks.{i}.norm.{norm}.scale"
        for i in range(dims.depth_single)
        for norm in ("query_norm", "key_norm")
    ]
    return keys


def random_bfl_state_dict(
    dims: FluxDims = TINY_DIMS, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random FLUX weights under BFL names; RMSNorm scales are 1 and weights ~N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, shape in bfl_weight_shapes(dims).items():
        sd[key] = (torch.randn(shape, generator=g) / shape[1] ** 0.5).to(dtype)
        sd[key[: -len("weight")] + "bias"] = (0.01 * torch.randn(shape[0], generator=g)).to(dtype)
    for key in bfl_norm_keys(dims):
        sd[key] = torch.ones(dims.head_dim, dtype=dtype)
    return sd


def write_tiny_flux(
    out: str | os.PathLike,
    fmt: str = "bfl",
    dims: FluxDims = TINY_DIMS,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a tiny FLUX as a BFL single ``.safetensors`` file or a diffusers transformer folder."""
    sd = random_bfl_state_dict(dims, seed, dtype)
    out = Path(out)
    meta = {"modelspec.architecture": "Flux.1-dev", "metalora_dev": "tiny-flux"}
    if fmt == "bfl":
        return save_tensors(out, sd, meta)
    if fmt == "diffusers":
        out.mkdir(parents=True, exist_ok=True)
        save_tensors(out / "diffusion_pytorch_model.safetensors", bfl_to_diffusers(sd), {"format": "pt"})
        save_diffusers_config(out, dims)
        return out
    raise ValueError(f"unknown format '{fmt}' (bfl or diffusers)")


def example_inputs(
    dims: FluxDims,
    batch: int = 1,
    height_tokens: int = 4,
    width_tokens: int = 4,
    text_tokens: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Keyword inputs for diffusers' ``FluxTransformer2DModel.forward`` (packed 2x2 latents, RoPE ids)."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(height_tokens, width_tokens, 3)
    img_ids[..., 1] = torch.arange(height_tokens)[:, None]
    img_ids[..., 2] = torch.arange(width_tokens)[None, :]
    inputs = {
        "hidden_states": torch.randn(
            batch, height_tokens * width_tokens, dims.in_channels * 4, generator=g, dtype=dtype
        ),
        "encoder_hidden_states": torch.randn(batch, text_tokens, dims.context_dim, generator=g, dtype=dtype),
        "timestep": torch.rand(batch, generator=g, dtype=dtype),
        "img_ids": img_ids.reshape(-1, 3).to(dtype),
        "txt_ids": torch.zeros(text_tokens, 3, dtype=dtype),
    }
    if dims.vec_dim:
        inputs["pooled_projections"] = torch.randn(batch, dims.vec_dim, generator=g, dtype=dtype)
    if dims.guidance:
        inputs["guidance"] = torch.full((batch,), 3.5, dtype=dtype)
    return inputs
