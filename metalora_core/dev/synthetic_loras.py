"""Write standard LoRA files in every layout users have (kohya, ComfyUI, diffusers/peft, ...) for tests.

A LoRA is given as ``{canonical layer: [(up, down, alpha), ...]}``: one pair for a fused layer, or one
pair per diffusers piece (``to_q``, ``to_k``, ``to_v``[, ``proj_mlp``]) in a split layout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..safeio import save_tensors
from ..targets import FluxDims, diffusers_pieces, kohya_name

Pair = tuple[torch.Tensor, torch.Tensor, float | None]
LAYOUTS = ("kohya", "comfyui", "comfyui-peft", "diffusers", "diffusers-old", "kohya-diffusers")
SPLIT_LAYOUTS = ("diffusers", "diffusers-old", "kohya-diffusers")


def _names(name: str, layout: str, dims: FluxDims, count: int) -> list[str]:
    if layout == "kohya":
        return [kohya_name(name)]
    if layout in ("comfyui", "comfyui-peft"):
        return [f"diffusion_model.{name}"]
    modules = [m for m, _ in diffusers_pieces(name, dims)]
    if count != len(modules):
        raise ValueError(f"layer '{name}' has {len(modules)} diffusers pieces, got {count} pairs")
    if layout == "kohya-diffusers":
        return ["lora_transformer_" + m.replace(".", "_") for m in modules]
    return [f"transformer.{m}" for m in modules]


def lora_tensors(
    layers: Mapping[str, Sequence[Pair]], layout: str, dims: FluxDims, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file in ``layout`` (alpha omitted where the layout has none or it is None)."""
    suffix = {
        "kohya": ("lora_up", "lora_down"),
        "comfyui": ("lora_up", "lora_down"),
        "kohya-diffusers": ("lora_up", "lora_down"),
        "comfyui-peft": ("lora_B", "lora_A"),
        "diffusers": ("lora_B", "lora_A"),
        "diffusers-old": ("lora.up", "lora.down"),
    }[layout]
    out: dict[str, torch.Tensor] = {}
    for name, pairs in layers.items():
        if layout not in SPLIT_LAYOUTS and len(pairs) != 1:
            raise ValueError(f"layout {layout} stores one fused pair per layer; '{name}' has {len(pairs)}")
        for prefix, (up, down, alpha) in zip(_names(name, layout, dims, len(pairs)), pairs):
            out[f"{prefix}.{suffix[0]}.weight"] = up.to(dtype).contiguous()
            out[f"{prefix}.{suffix[1]}.weight"] = down.to(dtype).contiguous()
            if alpha is not None and layout not in ("diffusers", "comfyui-peft"):
                out[f"{prefix}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def write_lora(
    path: str | os.PathLike,
    layers: Mapping[str, Sequence[Pair]],
    layout: str,
    dims: FluxDims,
    dtype: torch.dtype = torch.float32,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    return save_tensors(path, lora_tensors(layers, layout, dims, dtype), dict(metadata or {}))


def random_fused_lora(
    dims: FluxDims, preset: str = "attn", rank: int = 2, g: torch.Generator | None = None, alpha: float = 2.0
) -> dict[str, list[Pair]]:
    """Random fused up/down pairs for every layer of a preset (a generic LoRA, no shared structure)."""
    from ..targets import resolve_targets

    g = g or torch.Generator().manual_seed(0)
    return {
        t.name: [
            (
                torch.randn(t.out_features, rank, generator=g),
                torch.randn(rank, t.in_features, generator=g),
                alpha,
            )
        ]
        for t in resolve_targets(dims, preset)
    }
