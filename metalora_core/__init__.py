"""Meta-LoRA for FLUX.1 (arXiv 2503.22352): a meta-learned shared LoRA Meta-Down (LoMD) plus per-identity
Mid/Up layers trained from one photo. Standalone: this package never imports ComfyUI."""

__version__ = "0.1.0"

from .adapter import AdapterShape, BypassLinear, IdentityHead, delta_weight, fold_to_lora  # noqa: E402
from .errors import FingerprintMismatch, MetaLoRAError  # noqa: E402
from .formats import IdentityAdapter, LoMD, export_lora, load_identity, load_lomd, save_identity, save_lomd  # noqa: E402

__all__ = [
    "AdapterShape",
    "BypassLinear",
    "FingerprintMismatch",
    "IdentityAdapter",
    "IdentityHead",
    "LoMD",
    "MetaLoRAError",
    "delta_weight",
    "export_lora",
    "fold_to_lora",
    "load_identity",
    "load_lomd",
    "save_identity",
    "save_lomd",
]
