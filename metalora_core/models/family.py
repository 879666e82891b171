"""What a base-model family defines, as one protocol: everything else in ``metalora_core`` is family-blind.

A family (FLUX.1, Qwen-Image) owns its layer names and presets, its checkpoint and LoRA key layouts, how
latents become transformer tokens and positions, its flow-matching time shift, its VAE normalisation and the
shape of its text conditioning. Generic code asks the family of the model's sizes (``family_of(dims)``,
:mod:`metalora_core.models`) and never names a family itself. Adding a family is adding one module here
(plus its ComfyUI blocks in ``nodes/comfy_training/`` and its tiny model in ``metalora_core/dev/``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from ..errors import MetaLoRAError


@dataclass(frozen=True)
class Target:
    """One canonical adapter target: its name and the (out, in) shape of its (fused) weight."""

    name: str
    out_features: int
    in_features: int


@dataclass(frozen=True)
class LoraPlace:
    """Where one LoRA key prefix lands: canonical layer, piece index, written split?, layout name."""

    name: str
    piece: int
    split: bool
    layout: str


class ModelDims(Protocol):
    """Sizes of a transformer, read from its tensors. Every family's dims name their family."""

    family: ClassVar[str]
    hidden: int
    mlp_hidden: int
    context_dim: int
    vec_dim: int


class ModelFamily(Protocol):
    """The per-family knowledge the library, the CLI and the nodes consult (``FLUX``, ``QWEN_IMAGE``)."""

    name: str  # stored as ``base_arch`` in LoMDs and identities
    label: str  # what messages call it ("FLUX.1", "Qwen-Image")
    noun: str  # what progress lines call it ("FLUX", "Qwen-Image")
    lora_base_version: str  # ``ss_base_model_version`` of exported kohya LoRAs
    kohya_network_module: str  # ``ss_network_module`` of exported kohya LoRAs
    vae_class: str  # diffusers' class of its VAE (``_class_name`` in the VAE folder's config.json)
    video_vae: bool  # whether that VAE takes and returns clips (B, C, frames, H, W) rather than images
    comfy_text_encoder: str  # the ComfyUI loader of its text encoder, named in errors
    comfy_vae: str  # its VAE file in ComfyUI, named in errors
    comfy_masks_text: bool  # ComfyUI's model applies a CONDITIONING's attention_mask when sampling
    presets: Mapping[str, str]  # preset name -> help text (the same three names in every family)
    default_preset: str
    # flow matching: timesteps shift by exp(mu) for an image of n packed tokens, mu linear in n
    shift_range: tuple[int, int, float, float]  # (base tokens, max tokens, base mu, max mu)
    block_kinds: tuple[str, ...]  # the block lists canonical names start with
    global_layers: re.Pattern[str]  # LoRA keys outside the blocks (embedders, final layer): ignored

    # -- layers ------------------------------------------------------------------------------------
    def resolve_targets(self, dims: Any, preset: str | Iterable[str]) -> list[Target]: ...
    def layer_shape(self, dims: Any, name: str) -> tuple[int, int]: ...
    def diffusers_pieces(self, name: str, dims: Any) -> list[tuple[str, slice | None]]: ...
    def block_count(self, dims: Any, kind: str) -> int: ...

    # -- files -------------------------------------------------------------------------------------
    def owns(self, shapes: Mapping[str, object]) -> bool: ...
    def dims_from_shapes(self, shapes: Mapping[str, object], source: str) -> tuple[Any, str]: ...
    def dims_for_lora(self, hidden: int, mlp_hidden: int) -> Any: ...
    def place_lora_prefix(self, prefix: str) -> LoraPlace | None: ...
    def lora_sizes(self, pieces: list[tuple[str, int, bool, int, int]]) -> tuple[set[int], set[int]]: ...
    def diffusers_class(self) -> type: ...
    def diffusers_config(self, dims: Any) -> dict[str, object]: ...
    def finish_meta_model(self, model: Any, dims: Any) -> None: ...
    def to_diffusers(self, state_dict: Mapping[str, torch.Tensor], layout: str, source: str) -> dict: ...

    # -- latents, positions, text ------------------------------------------------------------------
    def model_inputs(self, x_t, t, cond, guidance, dims: Any, device, dtype) -> dict: ...
    def pack(self, latents: torch.Tensor) -> torch.Tensor: ...
    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor: ...
    def vae_normalize(self, latents: torch.Tensor, vae_config: Mapping[str, Any]) -> torch.Tensor: ...
    def vae_denormalize(self, latents: torch.Tensor, vae_config: Mapping[str, Any]) -> torch.Tensor: ...


# --- helpers every family uses ------------------------------------------------------------------------


def split_layer_name(name: str) -> tuple[str, int, str]:
    """``double_blocks.3.img_attn.qkv`` -> (``double_blocks``, 3, ``img_attn.qkv``); any family's blocks."""
    kind, index, layer = name.split(".", 2)
    return kind, int(index), layer


def kohya_name(name: str) -> str:
    """kohya / ComfyUI LoRA prefix of a canonical target: ``lora_unet_double_blocks_0_img_attn_qkv``."""
    return "lora_unet_" + name.replace(".", "_")


def count_blocks(keys: Iterable[str], prefix: str) -> int:
    """How many ``<prefix><i>.`` blocks the keys hold (highest index + 1)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def tensor_shape(tensors: Mapping[str, object], key: str, source: str, label: str) -> tuple[int, ...]:
    """The shape under ``key`` (a tensor or a shape tuple), or an error naming the file and the key."""
    if key not in tensors:
        raise MetaLoRAError(
            f"{source}: key '{key}' is missing; this does not look like a complete {label} model"
        )
    value = tensors[key]
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)  # type: ignore[arg-type]


def strip_prefixes(state_dict: Mapping[str, Any], prefixes: Iterable[str]) -> dict[str, Any]:
    """Drop the wrapper checkpoints put around a transformer's keys (``model.diffusion_model.``, ...)."""
    prefixes = tuple(prefixes)
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out


def match_targets(
    every: list[str], preset: str | Iterable[str], presets: Iterable[str], label: str, example: str
) -> list[str]:
    """Names of an explicit list of layer names / regular expressions, in the order given."""
    patterns = [preset] if isinstance(preset, str) else list(preset)
    names: list[str] = []
    for pattern in patterns:
        hits = [n for n in every if n == pattern or re.fullmatch(pattern, n)]
        if not hits:
            raise MetaLoRAError(
                f"target '{pattern}' is neither a preset ({', '.join(presets)}) nor a {label} layer name "
                f"or pattern matching one (e.g. {example})"
            )
        names += [n for n in hits if n not in names]
    return names


def linear_mu(image_tokens: int, shift_range: tuple[int, int, float, float]) -> float:
    """The time-shift parameter ``mu`` of a family for ``image_tokens`` packed tokens (linear in length)."""
    base_seq, max_seq, base_shift, max_shift = shift_range
    slope = (max_shift - base_shift) / (max_seq - base_seq)
    return base_shift + slope * (image_tokens - base_seq)


def exponential_shift(t: torch.Tensor, mu: float) -> torch.Tensor:
    """``exp(mu) / (exp(mu) + 1/t - 1)``: the flow-matching time shift FLUX and Qwen-Image both use."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4C)``: 2x2 patch tokens, row-major over the patch grid, each
    token channel-major then row, column (the layout FLUX and Qwen-Image share)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_2x2(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_2x2` for latents of ``height x width``."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)
