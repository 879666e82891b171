"""FLUX target map: canonical (BFL / ComfyUI) layer names, presets, and exact diffusers / kohya mappings.

Canonical names are FLUX's own module names, as ComfyUI uses them (``double_blocks.3.img_attn.qkv``).
diffusers splits some fused layers; there a canonical adapter maps to several diffusers layers, each with a
*row slice* of the adapter's ``Up`` (``Down`` and ``Mid`` are shared). All sizes come from the model's
tensors, never from FLUX.1-dev constants.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .errors import MetaLoRAError

DOUBLE_ATTN = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj")
DOUBLE_MLP = ("img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")
DOUBLE_MOD = ("img_mod.lin", "txt_mod.lin")
SINGLE_CORE = ("linear1", "linear2")
SINGLE_MOD = ("modulation.lin",)

PRESETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # name: (double-block layers, single-block layers)
    "attn": (DOUBLE_ATTN, SINGLE_CORE),
    "attn_mlp": (DOUBLE_ATTN + DOUBLE_MLP, SINGLE_CORE),
    "all_linear": (DOUBLE_ATTN + DOUBLE_MLP + DOUBLE_MOD, SINGLE_CORE + SINGLE_MOD),
}
DEFAULT_PRESET = "attn_mlp"
PRESET_HELP = {
    "attn": "double-block attention (qkv, proj) + single-block linear1/linear2 (they fuse attention and MLP)",
    "attn_mlp": "attn + double-block MLPs (default)",
    "all_linear": "attn_mlp + the modulation layers (img_mod, txt_mod, single modulation)",
}


@dataclass(frozen=True)
class FluxDims:
    """Sizes of a FLUX transformer, read from its tensors."""

    hidden: int
    mlp_hidden: int
    depth: int
    depth_single: int
    in_channels: int
    context_dim: int
    vec_dim: int
    guidance: bool
    out_channels: int
    head_dim: int = 128

    @property
    def heads(self) -> int:
        return self.hidden // self.head_dim


@dataclass(frozen=True)
class Target:
    """One canonical adapter target: its name and the (out, in) shape of its fused weight."""

    name: str
    out_features: int
    in_features: int


def _count_blocks(keys: Iterable[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def strip_bfl_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the wrappers checkpoints put around BFL keys (``model.diffusion_model.``, ``diffusion_model.``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for prefix in ("model.diffusion_model.", "diffusion_model."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out


def _shape(tensors: Mapping[str, object], key: str, source: str) -> tuple[int, ...]:
    if key not in tensors:
        raise MetaLoRAError(
            f"{source}: key '{key}' is missing; this does not look like a complete FLUX model"
        )
    value = tensors[key]
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)  # type: ignore[arg-type]


def dims_from_bfl(shapes: Mapping[str, object], source: str = "model") -> FluxDims:
    """Read FLUX sizes from BFL-named tensors (or a mapping of key -> shape)."""
    hidden, in_flat = _shape(shapes, "img_in.weight", source)
    ctx = _shape(shapes, "txt_in.weight", source)[1]
    vec = (
        _shape(shapes, "vector_in.in_layer.weight", source)[1] if "vector_in.in_layer.weight" in shapes else 0
    )
    depth = _count_blocks(shapes, "double_blocks.")
    depth_single = _count_blocks(shapes, "single_blocks.")
    if depth:
        mlp_hidden = _shape(shapes, "double_blocks.0.img_mlp.0.weight", source)[0]
        head_dim = _shape(shapes, "double_blocks.0.img_attn.norm.query_norm.scale", source)[0]
    else:
        mlp_hidden = _shape(shapes, "single_blocks.0.linear1.weight", source)[0] - 3 * hidden
        head_dim = _shape(shapes, "single_blocks.0.norm.query_norm.scale", source)[0]
    out_flat = _shape(shapes, "final_layer.linear.weight", source)[0]
    return FluxDims(
        hidden=hidden,
        mlp_hidden=mlp_hidden,
        depth=depth,
        depth_single=depth_single,
        in_channels=in_flat // 4,
        context_dim=ctx,
        vec_dim=vec,
        guidance="guidance_in.in_layer.weight" in shapes,
        out_channels=out_flat // 4,
        head_dim=head_dim,
    )


def dims_from_diffusers(shapes: Mapping[str, object], source: str = "model") -> FluxDims:
    """Read FLUX sizes from diffusers-named tensors (patch size 1 on packed 2x2 latents, as FLUX ships)."""
    hidden, in_flat = _shape(shapes, "x_embedder.weight", source)
    depth = _count_blocks(shapes, "transformer_blocks.")
    depth_single = _count_blocks(shapes, "single_transformer_blocks.")
    if depth:
        mlp_hidden = _shape(shapes, "transformer_blocks.0.ff.net.0.proj.weight", source)[0]
        head_dim = _shape(shapes, "transformer_blocks.0.attn.norm_q.weight", source)[0]
    else:
        mlp_hidden = _shape(shapes, "single_transformer_blocks.0.proj_mlp.weight", source)[0]
        head_dim = _shape(shapes, "single_transformer_blocks.0.attn.norm_q.weight", source)[0]
    text_key = "time_text_embed.text_embedder.linear_1.weight"
    return FluxDims(
        hidden=hidden,
        mlp_hidden=mlp_hidden,
        depth=depth,
        depth_single=depth_single,
        in_channels=in_flat // 4,
        context_dim=_shape(shapes, "context_embedder.weight", source)[1],
        vec_dim=_shape(shapes, text_key, source)[1] if text_key in shapes else 0,
        guidance="time_text_embed.guidance_embedder.linear_1.weight" in shapes,
        out_channels=_shape(shapes, "proj_out.weight", source)[0] // 4,
        head_dim=head_dim,
    )


def _fused_shape(dims: FluxDims, layer: str) -> tuple[int, int]:
    h, m = dims.hidden, dims.mlp_hidden
    table = {
        "img_attn.qkv": (3 * h, h),
        "txt_attn.qkv": (3 * h, h),
        "img_attn.proj": (h, h),
        "txt_attn.proj": (h, h),
        "img_mlp.0": (m, h),
        "txt_mlp.0": (m, h),
        "img_mlp.2": (h, m),
        "txt_mlp.2": (h, m),
        "img_mod.lin": (6 * h, h),
        "txt_mod.lin": (6 * h, h),
        "linear1": (3 * h + m, h),
        "linear2": (h, h + m),
        "modulation.lin": (3 * h, h),
    }
    return table[layer]


def layer_shape(dims: FluxDims, name: str) -> tuple[int, int]:
    """The fused ``(out, in)`` shape of one canonical layer (``double_blocks.3.img_attn.qkv``)."""
    return _fused_shape(dims, split_layer_name(name)[2])


def resolve_targets(dims: FluxDims, preset: str | Iterable[str] = DEFAULT_PRESET) -> list[Target]:
    """The canonical targets of a preset, or of an explicit list of names / regular expressions."""
    if isinstance(preset, str) and preset in PRESETS:
        double_layers, single_layers = PRESETS[preset]
        names = [f"double_blocks.{i}.{layer}" for i in range(dims.depth) for layer in double_layers]
        names += [f"single_blocks.{i}.{layer}" for i in range(dims.depth_single) for layer in single_layers]
    else:
        patterns = [preset] if isinstance(preset, str) else list(preset)
        every = [t.name for t in resolve_targets(dims, "all_linear")]
        names = []
        for pattern in patterns:
            hits = [n for n in every if n == pattern or re.fullmatch(pattern, n)]
            if not hits:
                raise MetaLoRAError(
                    f"target '{pattern}' is neither a preset ({', '.join(PRESETS)}) nor a FLUX layer name "
                    f"or pattern matching one (e.g. 'double_blocks.0.img_attn.qkv', 'single_blocks\\.\\d+\\.linear1')"
                )
            names += [n for n in hits if n not in names]
    return [Target(n, *_fused_shape(dims, n.split(".", 2)[2])) for n in names]


def split_layer_name(name: str) -> tuple[str, int, str]:
    """``double_blocks.3.img_attn.qkv`` -> (``double_blocks``, 3, ``img_attn.qkv``)."""
    kind, index, layer = name.split(".", 2)
    return kind, int(index), layer


_DOUBLE_TO_DIFFUSERS: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
}
_SINGLE_TO_DIFFUSERS: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}


def diffusers_pieces(name: str, dims: FluxDims) -> list[tuple[str, slice | None]]:
    """The diffusers modules a canonical target becomes, each with the row slice of the fused weight."""
    kind, index, layer = split_layer_name(name)
    if kind == "double_blocks":
        prefix, modules = f"transformer_blocks.{index}.", _DOUBLE_TO_DIFFUSERS[layer]
    elif kind == "single_blocks":
        prefix, modules = f"single_transformer_blocks.{index}.", _SINGLE_TO_DIFFUSERS[layer]
    else:
        raise MetaLoRAError(f"'{name}' is not a FLUX block layer")
    if len(modules) == 1:
        return [(prefix + modules[0], None)]
    h = dims.hidden
    sizes = [h, h, h] + ([dims.mlp_hidden] if len(modules) == 4 else [])
    pieces, start = [], 0
    for module, size in zip(modules, sizes):
        pieces.append((prefix + module, slice(start, start + size)))
        start += size
    return pieces


def _find_diffusers(text: str, sep: str) -> tuple[str, int] | None:
    """(canonical name, piece index) of a diffusers module written with ``sep`` between its parts."""
    for kind, dkind, table in (
        ("double_blocks", "transformer_blocks", _DOUBLE_TO_DIFFUSERS),
        ("single_blocks", "single_transformer_blocks", _SINGLE_TO_DIFFUSERS),
    ):
        m = re.fullmatch(rf"{dkind}{re.escape(sep)}(\d+){re.escape(sep)}(.+)", text)
        if not m:
            continue
        for layer, modules in table.items():
            names = [module.replace(".", sep) for module in modules]
            if m.group(2) in names:
                return f"{kind}.{m.group(1)}.{layer}", names.index(m.group(2))
    return None


def canonical_from_diffusers(module: str) -> tuple[str, int] | None:
    """Inverse of :func:`diffusers_pieces` for one diffusers module: (canonical name, piece index)."""
    return _find_diffusers(module, ".")


def canonical_from_kohya_diffusers(prefix: str) -> tuple[str, int] | None:
    """kohya-style names built from diffusers modules (``lora_transformer_single_transformer_blocks_0_attn_to_q``).

    Some trainers write these; underscores are ambiguous, so match against the known diffusers module set.
    Returns (canonical name, piece index) like :func:`canonical_from_diffusers`.
    """
    head = "lora_transformer_"
    return _find_diffusers(prefix[len(head) :], "_") if prefix.startswith(head) else None


def kohya_name(name: str) -> str:
    """kohya / ComfyUI LoRA prefix of a canonical target: ``lora_unet_double_blocks_0_img_attn_qkv``."""
    return "lora_unet_" + name.replace(".", "_")


def canonical_from_kohya(prefix: str, dims: FluxDims | None = None) -> str | None:
    """Inverse of :func:`kohya_name` (underscores are ambiguous, so match against the known layer set)."""
    m = re.fullmatch(r"lora_unet_(double_blocks|single_blocks)_(\d+)_(.+)", prefix)
    if not m:
        return None
    kind, index, rest = m.groups()
    layers = DOUBLE_ATTN + DOUBLE_MLP + DOUBLE_MOD if kind == "double_blocks" else SINGLE_CORE + SINGLE_MOD
    for layer in layers:
        if layer.replace(".", "_") == rest:
            return f"{kind}.{index}.{layer}"
    return None


# --- whole state-dict conversion (BFL <-> diffusers) -----------------------------------------------------

_GLOBAL_BFL_TO_DIFFUSERS = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE_NORMS = {
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def bfl_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Convert a BFL / ComfyUI FLUX state dict to diffusers' ``FluxTransformer2DModel`` names, exactly.

    Unlike diffusers' single-file converter this reads every size from the tensors, so it works for any
    width (tiny test models included). Unknown keys raise, naming the key.
    """
    sd = strip_bfl_prefix(state_dict)
    dims = dims_from_bfl(sd, source)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return sd[key]

    for bfl, diff in _GLOBAL_BFL_TO_DIFFUSERS.items():
        for suffix in ("weight", "bias"):
            if f"{bfl}.{suffix}" in sd:
                out[f"{diff}.{suffix}"] = take(f"{bfl}.{suffix}")
    for suffix in ("weight", "bias"):
        out[f"norm_out.linear.{suffix}"] = _swap_halves(take(f"final_layer.adaLN_modulation.1.{suffix}"))

    all_layers = resolve_targets(dims, "all_linear")
    for target in all_layers:
        kind, index, layer = split_layer_name(target.name)
        bfl_prefix = f"{kind}.{index}.{layer}"
        for suffix in ("weight", "bias"):
            key = f"{bfl_prefix}.{suffix}"
            if key not in sd:
                raise MetaLoRAError(
                    f"{source}: key '{key}' is missing; this does not look like a complete FLUX model"
                )
            fused = take(key)
            for module, rows in diffusers_pieces(target.name, dims):
                out[f"{module}.{suffix}"] = fused if rows is None else fused[rows].clone()
    for i in range(dims.depth):
        for bfl, diff in _DOUBLE_NORMS.items():
            out[f"transformer_blocks.{i}.{diff}"] = take(f"double_blocks.{i}.{bfl}")
    for i in range(dims.depth_single):
        for bfl, diff in _SINGLE_NORMS.items():
            out[f"single_transformer_blocks.{i}.{diff}"] = take(f"single_blocks.{i}.{bfl}")
    leftover = sorted(set(sd) - used)
    if leftover:
        raise MetaLoRAError(
            f"{source}: key '{leftover[0]}' is not part of a FLUX.1 transformer ({len(leftover)} unknown keys)"
        )
    return out


def diffusers_to_bfl(
    state_dict: Mapping[str, torch.Tensor], source: str = "model"
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`bfl_to_diffusers` (fused layers are concatenated back in canonical order)."""
    sd = dict(state_dict)
    dims = dims_from_diffusers(sd, source)
    out: dict[str, torch.Tensor] = {}
    for bfl, diff in _GLOBAL_BFL_TO_DIFFUSERS.items():
        for suffix in ("weight", "bias"):
            if f"{diff}.{suffix}" in sd:
                out[f"{bfl}.{suffix}"] = sd[f"{diff}.{suffix}"]
    for suffix in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = _swap_halves(sd[f"norm_out.linear.{suffix}"])
    for target in resolve_targets(dims, "all_linear"):
        for suffix in ("weight", "bias"):
            parts = [sd[f"{module}.{suffix}"] for module, _ in diffusers_pieces(target.name, dims)]
            out[f"{target.name}.{suffix}"] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    for i in range(dims.depth):
        for bfl, diff in _DOUBLE_NORMS.items():
            out[f"double_blocks.{i}.{bfl}"] = sd[f"transformer_blocks.{i}.{diff}"]
    for i in range(dims.depth_single):
        for bfl, diff in _SINGLE_NORMS.items():
            out[f"single_blocks.{i}.{bfl}"] = sd[f"single_transformer_blocks.{i}.{diff}"]
    return out


def diffusers_config_for(dims: FluxDims) -> dict[str, object]:
    """The ``FluxTransformer2DModel`` config that holds a model of these sizes."""
    if dims.head_dim != 128:
        raise MetaLoRAError(
            f"FLUX head size must be 128 (RoPE axes 16+56+56), this model has {dims.head_dim}"
        )
    if dims.mlp_hidden != 4 * dims.hidden:
        raise MetaLoRAError(
            f"diffusers FLUX needs an MLP 4x the hidden size, this model has {dims.mlp_hidden} for {dims.hidden}"
        )
    return {
        "patch_size": 1,
        "in_channels": dims.in_channels * 4,
        "out_channels": dims.out_channels * 4,
        "num_layers": dims.depth,
        "num_single_layers": dims.depth_single,
        "attention_head_dim": dims.head_dim,
        "num_attention_heads": dims.heads,
        "joint_attention_dim": dims.context_dim,
        "pooled_projection_dim": dims.vec_dim,
        "guidance_embeds": dims.guidance,
        "axes_dims_rope": (16, 56, 56),
    }
