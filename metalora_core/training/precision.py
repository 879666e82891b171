"""How the standalone trainer holds and runs FLUX's weights, decided in one place for the device in use.

One choice, ``--dtype``, says it all:

- ``auto`` (default): on a GPU bf16 weights and compute (float16 on GPUs without bf16), or the file's
  own dtype when that is smaller (an fp8 checkpoint stays fp8); on the CPU float32. Never float32
  weights on a GPU: FLUX.1-dev is 23.8 GB in bf16 and twice that in float32.
- ``bfloat16`` / ``float16`` / ``float32``: weights stored and computed in that dtype.
- ``float8_e4m3fn``: weights stored in fp8 (half of bf16) and computed in bf16, one layer at a time,
  through diffusers' ``enable_layerwise_casting`` (the norms and the in/out projections stay bf16, as
  diffusers decides).

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
        name = {v: k for k, v in DTYPE_NAMES.items()}
        text = f"{name[self.storage]} weights"
        if self.layerwise:
            text += f", {name[self.compute]} compute (cast layer by layer)"
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
        name = next(k for k, v in DTYPE_NAMES.items() if v == chosen)
        raise MetaLoRAError(
            f"--bf16 autocasts a float32 model to bf16 matmuls; with --dtype {requested} the weights are {name}, "
            "so it would do nothing: drop --bf16, or give --dtype float32 --bf16"
        )
    if chosen.itemsize == 1:
        return Precision(chosen, gpu_half(device))
    return Precision(chosen, chosen, bf16_autocast)


def enable_layerwise_casting(model: torch.nn.Module, precision: Precision) -> None:
    """Store ``model``'s weights in ``precision.storage``, compute each layer in ``precision.compute``:
    diffusers' own mechanism (hooks that cast a layer's weights on the way in and back on the way out)."""
    if precision.layerwise:
        model.enable_layerwise_casting(storage_dtype=precision.storage, compute_dtype=precision.compute)


__all__ = ["DTYPE_NAMES", "PRECISION_CHOICES", "Precision", "choose_precision", "enable_layerwise_casting"]
