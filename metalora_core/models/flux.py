"""The FLUX.1 family: canonical (BFL / ComfyUI) layer names, presets, exact diffusers / kohya mappings,
2x2 latent packing with ``(0, row, col)`` positions, and FLUX's resolution-dependent time shift.

Canonical names are FLUX's own module names, as ComfyUI uses them (``double_blocks.3.img_attn.qkv``).
diffusers splits some fused layers; there a canonical adapter maps to several diffusers layers, each with a
*row slice* of the adapter's ``Up`` (``Down`` and ``Mid`` are shared). All sizes come from the model's
tensors, never from FLUX.1-dev constants.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import MetaLoRAError
from .family import (
    LoraPlace,
    Target,
    count_blocks,
    linear_mu,
    match_targets,
    pack_2x2,
    split_layer_name,
    strip_prefixes,
    unpack_2x2,
)
from .family import tensor_shape as _family_shape

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

    family: ClassVar[str] = "flux"
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


CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def strip_bfl_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the wrappers checkpoints put around BFL keys (``model.diffusion_model.``, ``diffusion_model.``)."""
    return strip_prefixes(state_dict, CHECKPOINT_PREFIXES)


def _shape(tensors: Mapping[str, object], key: str, source: str) -> tuple[int, ...]:
    return _family_shape(tensors, key, source, "FLUX")


def dims_from_bfl(shapes: Mapping[str, object], source: str = "model") -> FluxDims:
    """Read FLUX sizes from BFL-named tensors (or a mapping of key -> shape)."""
    hidden, in_flat = _shape(shapes, "img_in.weight", source)
    ctx = _shape(shapes, "txt_in.weight", source)[1]
    vec = (
        _shape(shapes, "vector_in.in_layer.weight", source)[1] if "vector_in.in_layer.weight" in shapes else 0
    )
    depth = count_blocks(shapes, "double_blocks.")
    depth_single = count_blocks(shapes, "single_blocks.")
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
    depth = count_blocks(shapes, "transformer_blocks.")
    depth_single = count_blocks(shapes, "single_transformer_blocks.")
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
        every = [t.name for t in resolve_targets(dims, "all_linear")]
        example = "'double_blocks.0.img_attn.qkv', 'single_blocks\\.\\d+\\.linear1'"
        names = match_targets(every, preset, PRESETS, "FLUX", example)
    return [Target(n, *_fused_shape(dims, n.split(".", 2)[2])) for n in names]


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


# --- latents and positions (diffusers' FluxPipeline layout) ----------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4C)``: FLUX's 2x2 patch tokens, row-major over the patch grid."""
    return pack_2x2(latents)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for latents of ``height x width``."""
    return unpack_2x2(tokens, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """RoPE positions ``(0, row, col)`` of the packed tokens of ``height x width`` latents."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(height // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


# FluxPipeline's calculate_shift defaults (FLUX.1-dev's scheduler_config.json has the same numbers)
SHIFT_RANGE = (256, 4096, 0.5, 1.15)


def flux_mu(image_tokens: int) -> float:
    """FLUX's shift parameter for an image of ``image_tokens`` packed 2x2 latent tokens (linear in length)."""
    return linear_mu(image_tokens, SHIFT_RANGE)


# --- LoRA layouts ---------------------------------------------------------------------------------------

_LAYERS = {"double_blocks": DOUBLE_ATTN + DOUBLE_MLP + DOUBLE_MOD, "single_blocks": SINGLE_CORE + SINGLE_MOD}


def place_lora_prefix(prefix: str) -> LoraPlace | None:
    """Where a FLUX LoRA key prefix (wrappers already removed) lands, in any layout we read."""
    if prefix.startswith("lora_unet_"):
        name = canonical_from_kohya(prefix)
        return LoraPlace(name, 0, False, "kohya") if name else None
    if prefix.startswith("lora_transformer_"):
        hit = canonical_from_kohya_diffusers(prefix)
        return LoraPlace(hit[0], hit[1], True, "kohya-diffusers") if hit else None
    m = re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.(.+)", prefix)
    if m and m.group(3) in _LAYERS[m.group(1)]:
        return LoraPlace(prefix, 0, False, "comfyui")
    hit = canonical_from_diffusers(prefix)
    if hit:
        split = len(diffusers_pieces(hit[0], FluxDims(128, 512, 0, 0, 0, 0, 0, False, 0))) > 1
        return LoraPlace(hit[0], hit[1], split, "diffusers")
    return None


def lora_sizes(pieces: list[tuple[str, int, bool, int, int]]) -> tuple[set[int], set[int]]:
    """Hidden and MLP widths seen in LoRA factors: ``(layer, piece, split, in, out)`` per placed piece."""
    hidden: set[int] = set()
    mlp: set[int] = set()
    for name, index, split, in_f, out_f in pieces:
        layer = split_layer_name(name)[2]
        if layer in ("img_mlp.2", "txt_mlp.2"):
            mlp.add(in_f)
        elif layer != "linear2":
            hidden.add(in_f)
        if layer in ("img_mlp.0", "txt_mlp.0"):
            mlp.add(out_f)
        if layer == "linear1" and split and index == 3:
            mlp.add(out_f)
    if not hidden:  # only mlp.2 / linear2 layers: hidden = linear2 input / 5 (MLP 4x)
        hidden |= {in_f // 5 for name, _, _, in_f, _ in pieces if split_layer_name(name)[2] == "linear2"}
    return hidden, mlp


class FluxFamily:
    """FLUX.1 behind the :class:`~metalora_core.models.family.ModelFamily` protocol."""

    name = "flux"
    label = "FLUX.1"
    noun = "FLUX"  # what progress lines call it
    lora_base_version = "flux1"
    vae_class = "AutoencoderKL"  # diffusers' class of its VAE
    video_vae = False  # its VAE takes images (B, C, H, W)
    # in ComfyUI: what loads its text encoders and VAE (for errors on a mismatched input), and whether its
    # model honours a CONDITIONING's attention_mask when sampling (FLUX's ignores it)
    comfy_text_encoder = "the FLUX text encoders (DualCLIPLoader, type flux)"
    comfy_vae = "the FLUX VAE (ae.safetensors)"
    comfy_masks_text = False
    kohya_network_module = "networks.lora_flux"
    presets = PRESET_HELP
    default_preset = DEFAULT_PRESET
    shift_range = SHIFT_RANGE
    dims_type = FluxDims
    block_kinds = ("double_blocks", "single_blocks")
    # layers a LoRA may train outside the blocks (embedders, final layer): no LoMD covers them
    global_layers = re.compile(
        r"^(lora_unet_|lora_transformer_)?(img_in|txt_in|time_in|vector_in|guidance_in|final_layer|x_embedder|"
        r"context_embedder|proj_out|norm_out|time_text_embed)([._]|$)"
    )

    def resolve_targets(self, dims: FluxDims, preset: str | Iterable[str] = DEFAULT_PRESET) -> list[Target]:
        return resolve_targets(dims, preset)

    def layer_shape(self, dims: FluxDims, name: str) -> tuple[int, int]:
        return layer_shape(dims, name)

    def diffusers_pieces(self, name: str, dims: FluxDims) -> list[tuple[str, slice | None]]:
        return diffusers_pieces(name, dims)

    def block_count(self, dims: FluxDims, kind: str) -> int:
        return dims.depth if kind == "double_blocks" else dims.depth_single

    def dims_for_lora(self, hidden: int, mlp_hidden: int) -> FluxDims:
        """Sizes enough to place and slice LoRA layers of this width (no depth, no embedders)."""
        return FluxDims(hidden, mlp_hidden, 0, 0, 0, 0, 0, False, 0)

    def owns(self, shapes: Mapping[str, object]) -> bool:
        keys = strip_bfl_prefix(shapes)  # type: ignore[arg-type]
        return "txt_norm.weight" not in keys and ("img_in.weight" in keys or "x_embedder.weight" in keys)

    def dims_from_shapes(self, shapes: Mapping[str, object], source: str) -> tuple[FluxDims, str]:
        keys = strip_bfl_prefix(shapes)  # type: ignore[arg-type]
        if "x_embedder.weight" in keys:
            return dims_from_diffusers(keys, source), "diffusers"
        return dims_from_bfl(keys, source), "bfl"

    def place_lora_prefix(self, prefix: str) -> LoraPlace | None:
        return place_lora_prefix(prefix)

    def lora_sizes(self, pieces: list[tuple[str, int, bool, int, int]]) -> tuple[set[int], set[int]]:
        return lora_sizes(pieces)

    def diffusers_class(self) -> type:
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    def diffusers_config(self, dims: FluxDims) -> dict[str, object]:
        return diffusers_config_for(dims)

    def finish_meta_model(self, model, dims: FluxDims) -> None:
        """Nothing to rebuild: FLUX's RoPE is computed in every forward."""

    def to_diffusers(self, state_dict: Mapping[str, torch.Tensor], layout: str, source: str) -> dict:
        return bfl_to_diffusers(state_dict, source) if layout == "bfl" else dict(state_dict)

    def model_inputs(self, x_t, t, cond, guidance, dims: FluxDims, device, dtype) -> dict:
        """``FluxTransformer2DModel`` keyword inputs for unpacked latents ``x_t`` at flow times ``t``;
        ``guidance`` goes to the guidance embedder (None: the model has none)."""
        b, _, h, w = x_t.shape
        context, pooled = cond.batch(b, device, dtype)
        if pooled is None and dims.vec_dim:
            pooled = torch.zeros(b, dims.vec_dim, device=device, dtype=dtype)
        kwargs = {
            "hidden_states": pack_latents(x_t.to(device, dtype)),
            "encoder_hidden_states": context,
            "pooled_projections": pooled,
            "timestep": t.to(device, dtype).reshape(b),
            "img_ids": image_ids(h, w, device, dtype),
            "txt_ids": torch.zeros(context.shape[1], 3, device=device, dtype=dtype),
        }
        if guidance is not None:
            kwargs["guidance"] = torch.full((b,), float(guidance), device=device, dtype=dtype)
        return kwargs

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return pack_latents(latents)

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return unpack_latents(tokens, height, width)

    def vae_normalize(self, latents: torch.Tensor, vae_config: Mapping) -> torch.Tensor:
        """diffusers' FLUX VAE latents -> what the transformer sees: ``(z - shift) * scale``."""
        return (latents - float(vae_config.get("shift_factor") or 0.0)) * float(vae_config["scaling_factor"])

    def vae_denormalize(self, latents: torch.Tensor, vae_config: Mapping) -> torch.Tensor:
        return latents / float(vae_config["scaling_factor"]) + float(vae_config.get("shift_factor") or 0.0)


FLUX = FluxFamily()
