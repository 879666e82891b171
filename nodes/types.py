"""The pack's custom ComfyUI socket types (names are the team contract)."""

from __future__ import annotations

from comfy_api.latest import io

LoMDType = io.Custom("METALORA_LOMD")
IdentityType = io.Custom("METALORA_IDENTITY")
CATEGORY = "MetaLoRA"
