"""The Qwen-Image family (the 20 B MMDiT of ``Qwen/Qwen-Image``): layer names, key layouts, latents, shift.

Canonical names are the transformer's own module names, which ComfyUI (``comfy/ldm/qwen_image/model.py``)
and diffusers (``QwenImageTransformer2DModel``) share: ``transformer_blocks.7.attn.to_q``. No layer is fused,
so every canonical target is exactly one module in both (no row slices). Sizes come from the tensors.

Conventions, each pinned against diffusers' ``QwenImagePipeline`` in tests/models:

- latents ``(B, 16, H, W)`` pack into 2x2 patch tokens exactly as FLUX's (``_pack_latents``);
- positions are not passed as ids: the transformer builds its centred RoPE from ``img_shapes``
  ``(frames=1, H/2, W/2)`` and the text length;
- the flow time ``t`` in [0, 1] is the model's timestep input (it scales by 1000 inside);
- the time shift is FLUX's exponential shift with Qwen-Image's own ``mu`` range (scheduler_config.json of
  Qwen/Qwen-Image: 256..8192 tokens, mu 0.5..0.9);
- the VAE (``AutoencoderKLQwenImage``, Wan 2.1's) normalises per channel: ``(z - latents_mean) / latents_std``;
- text conditioning is Qwen2.5-VL's last hidden states, ``(tokens, 3584)``; there is no pooled vector and
  no guidance embedder.
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
    strip_prefixes,
    tensor_shape,
    unpack_2x2,
)

ATTN = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
MLP = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
MOD = ("img_mod.1", "txt_mod.1")
# The last block's text stream feeds nothing (only image tokens reach the output layer): these layers
# would get no gradient, so presets leave them out there.
DEAD_IN_LAST_BLOCK = ("attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2", "txt_mod.1")
LAYERS = ATTN + MLP + MOD
PRESETS: dict[str, tuple[str, ...]] = {"attn": ATTN, "attn_mlp": ATTN + MLP, "all_linear": LAYERS}
DEFAULT_PRESET = "attn_mlp"
PRESET_HELP = {
    "attn": "joint attention: image and text q/k/v and output projections",
    "attn_mlp": "attn + the image and text MLPs (default)",
    "all_linear": "attn_mlp + the modulation layers (img_mod, txt_mod)",
}
BLOCKS = "transformer_blocks"
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
# Qwen/Qwen-Image scheduler/scheduler_config.json: base_image_seq_len, max_image_seq_len, base_shift, max_shift
SHIFT_RANGE = (256, 8192, 0.5, 0.9)
LABEL = "Qwen-Image"


@dataclass(frozen=True)
class QwenImageDims:
    """Sizes of a Qwen-Image transformer, read from its tensors."""

    family: ClassVar[str] = "qwen_image"
    hidden: int
    mlp_hidden: int
    depth: int
    in_channels: int  # latent channels (16); the patch embedder reads 4x that
    context_dim: int  # Qwen2.5-VL hidden size (3584)
    out_channels: int
    head_dim: int = 128

    @property
    def heads(self) -> int:
        return self.hidden // self.head_dim

    @property
    def vec_dim(self) -> int:
        return 0  # no pooled text vector

    @property
    def guidance(self) -> bool:
        return False

    @property
    def depth_single(self) -> int:
        return 0  # one block kind only

    @property
    def axes_dims_rope(self) -> tuple[int, int, int]:
        """RoPE axes (frame, row, column): Qwen-Image's (16, 56, 56) for head size 128, the same split
        (1/8, 7/16, 7/16) for smaller test models."""
        if self.head_dim % 32:
            raise MetaLoRAError(
                f"Qwen-Image head size must be a multiple of 32, this model has {self.head_dim}"
            )
        return (self.head_dim // 8, 7 * self.head_dim // 16, 7 * self.head_dim // 16)


def _fused_shape(dims: QwenImageDims, layer: str) -> tuple[int, int]:
    h, m = dims.hidden, dims.mlp_hidden
    if layer in ATTN:
        return (h, h)
    if layer.endswith("net.0.proj"):
        return (m, h)
    if layer.endswith("net.2"):
        return (h, m)
    if layer in MOD:
        return (6 * h, h)
    raise MetaLoRAError(f"'{layer}' is not a Qwen-Image block layer ({', '.join(LAYERS)})")


def split_name(name: str) -> tuple[int, str]:
    """``transformer_blocks.3.attn.to_q`` -> (3, ``attn.to_q``)."""
    m = re.fullmatch(rf"{BLOCKS}\.(\d+)\.(.+)", name)
    if not m or m.group(2) not in LAYERS:
        raise MetaLoRAError(f"'{name}' is not a Qwen-Image block layer (transformer_blocks.N.<layer>)")
    return int(m.group(1)), m.group(2)


def resolve_targets(dims: QwenImageDims, preset: str | Iterable[str] = DEFAULT_PRESET) -> list[Target]:
    """The canonical targets of a preset, or of an explicit list of names / regular expressions."""
    if isinstance(preset, str) and preset in PRESETS:
        names = [
            f"{BLOCKS}.{i}.{layer}"
            for i in range(dims.depth)
            for layer in PRESETS[preset]
            if not (i == dims.depth - 1 and layer in DEAD_IN_LAST_BLOCK)
        ]
    else:
        every = [f"{BLOCKS}.{i}.{layer}" for i in range(dims.depth) for layer in LAYERS]
        names = match_targets(every, preset, PRESETS, LABEL, "'transformer_blocks.0.attn.to_q'")
    return [Target(n, *_fused_shape(dims, split_name(n)[1])) for n in names]


def dims_from_shapes(shapes: Mapping[str, object], source: str = "model") -> QwenImageDims:
    """Qwen-Image sizes from its tensors (or a mapping of key -> shape), any wrapper prefix removed."""
    keys = strip_prefixes(shapes, CHECKPOINT_PREFIXES)
    hidden, in_flat = tensor_shape(keys, "img_in.weight", source, LABEL)
    depth = count_blocks(keys, f"{BLOCKS}.")
    if not depth:
        raise MetaLoRAError(
            f"{source}: no transformer_blocks; this does not look like a complete {LABEL} model"
        )
    return QwenImageDims(
        hidden=hidden,
        mlp_hidden=tensor_shape(keys, f"{BLOCKS}.0.img_mlp.net.0.proj.weight", source, LABEL)[0],
        depth=depth,
        in_channels=in_flat // 4,
        context_dim=tensor_shape(keys, "txt_norm.weight", source, LABEL)[0],
        out_channels=tensor_shape(keys, "proj_out.weight", source, LABEL)[0] // 4,
        head_dim=tensor_shape(keys, f"{BLOCKS}.0.attn.norm_q.weight", source, LABEL)[0],
    )


def diffusers_config_for(dims: QwenImageDims) -> dict[str, object]:
    """The ``QwenImageTransformer2DModel`` config that holds a model of these sizes."""
    if dims.mlp_hidden != 4 * dims.hidden:
        raise MetaLoRAError(
            f"Qwen-Image needs an MLP 4x the hidden size, this model has {dims.mlp_hidden} for {dims.hidden}"
        )
    return {
        "patch_size": 2,
        "in_channels": dims.in_channels * 4,
        "out_channels": dims.out_channels,
        "num_layers": dims.depth,
        "attention_head_dim": dims.head_dim,
        "num_attention_heads": dims.heads,
        "joint_attention_dim": dims.context_dim,
        "axes_dims_rope": dims.axes_dims_rope,
    }


def _from_joined(text: str, sep: str) -> str | None:
    """Canonical name of ``transformer_blocks<sep>3<sep>attn<sep>to_q`` (underscores are ambiguous, so the
    layer part is matched against the known layer set)."""
    m = re.fullmatch(rf"{BLOCKS.replace('_', '[_.]')}{re.escape(sep)}(\d+){re.escape(sep)}(.+)", text)
    if not m:
        return None
    for layer in LAYERS:
        if layer.replace(".", sep) == m.group(2):
            return f"{BLOCKS}.{m.group(1)}.{layer}"
    return None


def place_lora_prefix(prefix: str) -> LoraPlace | None:
    """Where a Qwen-Image LoRA key prefix (wrappers already removed) lands: kohya ``lora_unet_``, kohya
    over diffusers names ``lora_transformer_``, SimpleTuner ``lycoris_`` or diffusers / peft dotted names."""
    for head, layout in (
        ("lora_unet_", "kohya"),
        ("lora_transformer_", "kohya-diffusers"),
        ("lycoris_", "lycoris"),
    ):
        if prefix.startswith(head):
            name = _from_joined(prefix[len(head) :], "_")
            return LoraPlace(name, 0, False, layout) if name else None
    name = _from_joined(prefix, ".")
    return LoraPlace(name, 0, False, "diffusers") if name else None


def lora_sizes(pieces: list[tuple[str, int, bool, int, int]]) -> tuple[set[int], set[int]]:
    """Hidden and MLP widths seen in LoRA factors: ``(layer, piece, split, in, out)`` per placed piece."""
    hidden: set[int] = set()
    mlp: set[int] = set()
    for name, _, _, in_f, out_f in pieces:
        layer = split_name(name)[1]
        if layer.endswith("net.2"):
            mlp.add(in_f)
        else:
            hidden.add(in_f)
        if layer.endswith("net.0.proj"):
            mlp.add(out_f)
    return hidden, mlp


class QwenImageFamily:
    """Qwen-Image behind the :class:`~metalora_core.models.family.ModelFamily` protocol."""

    name = "qwen_image"
    label = LABEL
    noun = LABEL
    lora_base_version = "qwen_image"
    vae_class = "AutoencoderKLQwenImage"  # Wan 2.1's VAE
    video_vae = True  # its VAE takes and returns clips (B, C, frames, H, W)
    comfy_text_encoder = "Qwen2.5-VL (CLIPLoader, type qwen_image)"
    comfy_vae = "the Qwen-Image VAE (qwen_image_vae.safetensors)"
    comfy_masks_text = True  # ComfyUI's Qwen-Image applies the prompt's attention_mask
    kohya_network_module = "networks.lora_qwen_image"
    presets = PRESET_HELP
    default_preset = DEFAULT_PRESET
    shift_range = SHIFT_RANGE
    dims_type = QwenImageDims
    block_kinds = (BLOCKS,)
    global_layers = re.compile(
        r"^(lora_unet_|lora_transformer_|lycoris_)?(img_in|txt_in|txt_norm|time_text_embed|norm_out|proj_out)([._]|$)"
    )

    def resolve_targets(
        self, dims: QwenImageDims, preset: str | Iterable[str] = DEFAULT_PRESET
    ) -> list[Target]:
        return resolve_targets(dims, preset)

    def layer_shape(self, dims: QwenImageDims, name: str) -> tuple[int, int]:
        return _fused_shape(dims, split_name(name)[1])

    def diffusers_pieces(self, name: str, dims: QwenImageDims) -> list[tuple[str, slice | None]]:
        split_name(name)  # validates
        return [(name, None)]

    def block_count(self, dims: QwenImageDims, kind: str) -> int:
        return dims.depth if kind == BLOCKS else 0

    def dims_for_lora(self, hidden: int, mlp_hidden: int) -> QwenImageDims:
        return QwenImageDims(hidden, mlp_hidden, 0, 0, 0, 0)

    def owns(self, shapes: Mapping[str, object]) -> bool:
        keys = strip_prefixes(shapes, CHECKPOINT_PREFIXES)
        return "txt_norm.weight" in keys and "img_in.weight" in keys

    def dims_from_shapes(self, shapes: Mapping[str, object], source: str) -> tuple[QwenImageDims, str]:
        return dims_from_shapes(shapes, source), "diffusers"  # ComfyUI's files use diffusers' names too

    def place_lora_prefix(self, prefix: str) -> LoraPlace | None:
        return place_lora_prefix(prefix)

    def lora_sizes(self, pieces: list[tuple[str, int, bool, int, int]]) -> tuple[set[int], set[int]]:
        return lora_sizes(pieces)

    def diffusers_class(self) -> type:
        from diffusers import QwenImageTransformer2DModel

        return QwenImageTransformer2DModel

    def diffusers_config(self, dims: QwenImageDims) -> dict[str, object]:
        return diffusers_config_for(dims)

    def finish_meta_model(self, model, dims: QwenImageDims) -> None:
        """A model built on the meta device and loaded with ``assign=True`` keeps its RoPE tables (plain
        attributes, not state) on meta: build them again, on the CPU."""
        from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

        model.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(dims.axes_dims_rope), scale_rope=True)

    def to_diffusers(self, state_dict: Mapping[str, torch.Tensor], layout: str, source: str) -> dict:
        sd = strip_prefixes(state_dict, CHECKPOINT_PREFIXES)
        sd.pop("__index_timestep_zero__", None)  # ComfyUI's marker of the 2511 edit model, not a weight
        return sd

    def model_inputs(self, x_t, t, cond, guidance, dims: QwenImageDims, device, dtype) -> dict:
        """``QwenImageTransformer2DModel`` keyword inputs for unpacked latents ``x_t`` at flow times ``t``:
        the model builds its RoPE from ``img_shapes`` and the text length (no padding mask: every token of
        one encoded prompt is real). There is no guidance embedder."""
        b, _, h, w = x_t.shape
        context, _ = cond.batch(b, device, dtype)
        return {
            "hidden_states": pack_2x2(x_t.to(device, dtype)),
            "encoder_hidden_states": context,
            "encoder_hidden_states_mask": None,
            "timestep": t.to(device, dtype).reshape(b),
            "img_shapes": [[(1, h // 2, w // 2)]] * b,
        }

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return pack_2x2(latents)

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return unpack_2x2(tokens, height, width)

    def vae_normalize(self, latents: torch.Tensor, vae_config: Mapping) -> torch.Tensor:
        """``AutoencoderKLQwenImage`` latents -> what the transformer sees: ``(z - mean) / std`` per channel."""
        mean, std = _channel_stats(latents, vae_config)
        return (latents - mean) / std

    def vae_denormalize(self, latents: torch.Tensor, vae_config: Mapping) -> torch.Tensor:
        mean, std = _channel_stats(latents, vae_config)
        return latents * std + mean


def _channel_stats(latents: torch.Tensor, vae_config: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, latents.shape[1]) + (1,) * (latents.ndim - 2)
    mean = torch.tensor(vae_config["latents_mean"], dtype=latents.dtype, device=latents.device).view(shape)
    std = torch.tensor(vae_config["latents_std"], dtype=latents.dtype, device=latents.device).view(shape)
    return mean, std


def qwen_mu(image_tokens: int) -> float:
    """Qwen-Image's shift parameter for ``image_tokens`` packed tokens (diffusers' ``calculate_shift``)."""
    return linear_mu(image_tokens, SHIFT_RANGE)


QWEN_IMAGE = QwenImageFamily()
