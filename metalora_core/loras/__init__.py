"""Standard LoRA files (kohya, ComfyUI, diffusers/peft) as exact per-layer factors: see :mod:`.read`."""

from .read import (
    DamagedLoraError,
    ForeignLoraError,
    LoraFile,
    LoraLayer,
    LoraPiece,
    LoraReadError,
    content_hash,
    iter_layers,
    read_lora,
    scan_lora,
    scan_loras,
)

__all__ = [
    "DamagedLoraError",
    "ForeignLoraError",
    "LoraFile",
    "LoraLayer",
    "LoraPiece",
    "LoraReadError",
    "content_hash",
    "iter_layers",
    "read_lora",
    "scan_lora",
    "scan_loras",
]
