"""The pack's custom ComfyUI socket types (names are the team contract)."""

from __future__ import annotations

from comfy_api.latest import io

LoMDType = io.Custom("METALORA_LOMD")
IdentityType = io.Custom("METALORA_IDENTITY")
AdaptersType = io.Custom("METALORA_ADAPTERS")  # a list of compose_model.AdapterSpec, in chained order
CATEGORY = "MetaLoRA"


def strength_input(tooltip: str) -> io.Float.Input:
    """The identity strength (-10..10, default 1): shared by Apply and Export so both mean the same."""
    return io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip=tooltip)


def fixed_seed_input(tooltip: str) -> io.Int.Input:
    """A seed that stays fixed after each run (not the front end's default 'randomize'): a new seed per queue
    would retrain an identity, or rebuild a LoMD and invalidate every identity trained on it."""
    return io.Int.Input(
        "seed",
        default=0,
        min=0,
        max=2**31 - 1,
        control_after_generate=io.ControlAfterGenerate.fixed,
        tooltip=tooltip,
    )
