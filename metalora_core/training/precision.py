"""How the standalone trainer holds and runs FLUX's weights, decided in one place for the device in use.

One choice, ``--dtype``, says it all:

- ``auto`` (default): on a GPU bf16 weights and compute (float16 on GPUs without bf16), or the file's
  own dtype when that is smaller (an fp8 checkpoint stays fp8); on the CPU float32. Never float32
  weights on a GPU: FLUX.1-dev is 23.8 GB in bf16 and twice that in float32.
- ``bfloat16`` / ``float16`` / ``float32``: weights stored and computed in that dtype.
- ``float8_e4m3fn``: linear weights stored in fp8 (half of bf16) and computed in bf16, one layer at a
  time, through diffusers' layer-wise casting (:func:`store_layerwise`; norms, RoPE and the final
  projection stay bf16).

``--bf16`` is older and narrower: bf16 *autocast* of a float32 model (float32 weights, bf16 matmuls). It
only means something with ``--dtype float32`` and is refused with anything else, instead of being ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MetaLoRAError

DTYPE_NAMES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
PRECISION_CHOICES = ("auto", *DTYPE_NAMES)


def dtype_name(dtype: torch.dtype) -> str:
    """The ``--dtype`` name of a dtype."""
    return next(name for name, value in DTYPE_NAMES.items() if value == dtype)


@dataclass(frozen=True)
class Precision:
    """Weights at rest (``storage``), the dtype layers compute in, and bf16 autocast on float32 weights."""

    storage: torch.dtype
    compute: torch.dtype
    autocast: bool = False

    @property
    def layerwise(self) -> bool:
        """Weights are cast to ``compute`` layer by layer as they run (fp8 storage)."""
        return self.storage != self.compute

    def describe(self) -> str:
        text = f"{dtype_name(self.storage)} weights"
        if self.layerwise:
            text += f", {dtype_name(self.compute)} compute (cast layer by layer)"
        if self.autocast:
            text += ", bf16 autocast"
        return text


def gpu_half(device: torch.device) -> torch.dtype:
    """bf16 where the GPU has it (Ampere and newer), else float16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def choose_precision(
    requested: str, device: torch.device, file_dtype: torch.dtype | None = None, bf16_autocast: bool = False
) -> Precision:
    """The :class:`Precision` for ``--dtype requested`` on ``device`` (``file_dtype``: the checkpoint's)."""
    if requested not in PRECISION_CHOICES:
        raise MetaLoRAError(f"--dtype {requested}: one of {', '.join(PRECISION_CHOICES)}")
    if requested == "auto":
        if device.type == "cpu":
            chosen = torch.float32
        else:
            chosen = gpu_half(device)
            if (
                file_dtype is not None
                and file_dtype.itemsize < chosen.itemsize
                and file_dtype.is_floating_point
            ):
                chosen = file_dtype  # an fp8 file stays fp8 in memory
    else:
        chosen = DTYPE_NAMES[requested]
    if bf16_autocast and chosen != torch.float32:
        raise MetaLoRAError(
            f"--bf16 autocasts a float32 model to bf16 matmuls; with --dtype {requested} the weights are "
            f"{dtype_name(chosen)}, "
            "so it would do nothing: drop --bf16, or give --dtype float32 --bf16"
        )
    if chosen.itemsize == 1:
        return Precision(chosen, gpu_half(device))
    return Precision(chosen, chosen, bf16_autocast)


# Layers that stay in the compute dtype under fp8 storage: RoPE and the final projection (diffusers' own
# choice). diffusers' FLUX default also keeps every "norm" module, which for FLUX means the AdaLayerNorm
# modulation linears: 3.0 GiB of FLUX.1-dev's 14.1 GiB in "fp8". They are stored in fp8 here, as ComfyUI's
# fp8 weight modes store every linear, which leaves 11.1 GiB (bench/sizes.py prints the table).
FP8_KEEP = ("pos_embed", "^proj_out$")


def hooked_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules diffusers runs a hook around (layer-wise casting, offloading): their weights change
    storage on every call."""
    return [m for m in model.modules() if getattr(m, "_diffusers_hook", None) is not None]


def store_layerwise(model: torch.nn.Module, storage: torch.dtype, compute: torch.dtype) -> None:
    """Store ``model``'s linear weights in ``storage`` and compute each layer in ``compute``: diffusers' own
    layer-wise casting (hooks that cast a layer's weights on the way in and back on the way out)."""
    from diffusers.hooks import apply_layerwise_casting

    apply_layerwise_casting(model, storage, compute, skip_modules_pattern=FP8_KEEP)


__all__ = [
    "DTYPE_NAMES",
    "FP8_KEEP",
    "PRECISION_CHOICES",
    "Precision",
    "choose_precision",
    "dtype_name",
    "hooked_modules",
    "store_layerwise",
]
