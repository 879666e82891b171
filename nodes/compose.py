"""Composition nodes: build an adapter list (identities, LoRA files), then Merge / Switch / Composite it."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..metalora_core.errors import MetaLoRAError
from .comfy_model.compose_model import AdapterSpec, compose
from .types import CATEGORY, AdaptersType, IdentityType, LoMDType

_GROUP = f"{CATEGORY}/compose"


def _list_inputs() -> list:
    """Strength, composite weight and the optional incoming list: shared by both adapter nodes."""
    return [
        io.Float.Input(
            "strength",
            default=1.0,
            min=-10.0,
            max=10.0,
            step=0.01,
            tooltip="How strongly this adapter acts whenever it is active (1 = as trained, 0 = off).",
        ),
        io.Float.Input(
            "weight",
            default=1.0,
            min=0.0,
            max=100.0,
            step=0.01,
            tooltip="Composite only: this adapter's share of the averaged prediction (weights are "
            "normalized to sum to 1). Merge and Switch ignore it.",
        ),
        AdaptersType.Input(
            "adapters",
            optional=True,
            tooltip="Adapters listed so far (chain several Adapter nodes); this one is appended.",
        ),
    ]


def _append(adapters, spec: AdapterSpec) -> list[AdapterSpec]:
    return [*(adapters or []), spec]


class MetaLoRAAdapterIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MetaLoRAAdapterIdentity",
            display_name="Adapter: Meta-LoRA Identity",
            category=_GROUP,
            description="Adds a Meta-LoRA identity to an adapter list for Merge, Switch or Composite.",
            inputs=[
                LoMDType.Input("lomd", tooltip="The LoMD the identity was trained with."),
                IdentityType.Input("identity", tooltip="The identity adapter (from Train or Load Identity)."),
                *_list_inputs(),
            ],
            outputs=[
                AdaptersType.Output(display_name="adapters", tooltip="The list with this identity added.")
            ],
        )

    @classmethod
    def execute(cls, lomd, identity, strength, weight, adapters=None) -> io.NodeOutput:
        label = f"identity #{len(adapters or []) + 1}"
        spec = AdapterSpec(label, float(strength), float(weight), lomd=lomd, identity=identity)
        return io.NodeOutput(_append(adapters, spec))


class MetaLoRAAdapterLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MetaLoRAAdapterLoRA",
            display_name="Adapter: LoRA File",
            category=_GROUP,
            description=(
                "Adds an ordinary LoRA file from models/loras (kohya, diffusers or ComfyUI naming, read by "
                "ComfyUI's own LoRA loader) to an adapter list for Merge, Switch or Composite."
            ),
            inputs=[
                io.Combo.Input(
                    "lora_name",
                    options=folder_paths.get_filename_list("loras"),
                    tooltip="A LoRA .safetensors in ComfyUI/models/loras.",
                ),
                *_list_inputs(),
            ],
            outputs=[AdaptersType.Output(display_name="adapters", tooltip="The list with this LoRA added.")],
        )

    @classmethod
    def execute(cls, lora_name, strength, weight, adapters=None) -> io.NodeOutput:
        path = folder_paths.get_full_path("loras", lora_name)
        if path is None or not os.path.isfile(path):
            raise MetaLoRAError(f"LoRA '{lora_name}' is not in models/loras")
        spec = AdapterSpec(f"LoRA '{lora_name}'", float(strength), float(weight), lora_path=path)
        return io.NodeOutput(_append(adapters, spec))


def _compose_schema(
    node_id: str, name: str, description: str, extra: list, adapters_tip: str = ""
) -> io.Schema:
    return io.Schema(
        node_id=node_id,
        display_name=name,
        category=_GROUP,
        description=description,
        inputs=[
            io.Model.Input("model", tooltip="The FLUX diffusion model (e.g. from Load Diffusion Model)."),
            AdaptersType.Input(
                "adapters", tooltip=f"The adapters, from chained 'Adapter: ...' nodes.{adapters_tip}"
            ),
            *extra,
        ],
        outputs=[
            io.Model.Output(display_name="model", tooltip="A copy of the model; the input is unchanged.")
        ],
    )


class MetaLoRAComposeMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _compose_schema(
            "MetaLoRAComposeMerge",
            "Compose Adapters (Merge)",
            "All adapters active at once, each at its strength: the weights become W + sum of "
            "strength x change, patched by ComfyUI as stacked LoRA loaders would. Same speed as one LoRA.",
            [],
        )

    @classmethod
    def execute(cls, model, adapters) -> io.NodeOutput:
        return io.NodeOutput(compose(model, adapters, "merge"))


class MetaLoRAComposeSwitch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _compose_schema(
            "MetaLoRAComposeSwitch",
            "Compose Adapters (Switch)",
            "One adapter active at a time, taking turns every k sampling steps in list order (steps "
            "0..k-1 the first, then the second, ...). Adapters run in bypass mode, so switching re-patches "
            "no weights; the cost per step is that of one adapter. Steps are counted within each sampler "
            "run: a KSamplerAdvanced stage that starts at step s > 0 starts again at the first adapter.",
            [
                io.Int.Input(
                    "every",
                    default=1,
                    min=1,
                    max=1000,
                    tooltip="Switch to the next adapter every this many sampling steps (k). Steps are "
                    "counted from the first step of each sampler run (ComfyUI gives a KSamplerAdvanced "
                    "stage only its own part of the schedule), so a later stage starts again at the first "
                    "adapter; to continue the turns, start it at a multiple of k and rotate its list.",
                )
            ],
        )

    @classmethod
    def execute(cls, model, adapters, every) -> io.NodeOutput:
        return io.NodeOutput(compose(model, adapters, "switch", int(every)))


class MetaLoRAComposeComposite(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _compose_schema(
            "MetaLoRAComposeComposite",
            "Compose Adapters (Composite)",
            "At every step the denoiser runs once per adapter (only that adapter active) and the "
            "predictions are averaged with the adapters' weights, so a strong style LoRA cannot dilute an "
            "identity. The cost grows with the number of adapters: N adapters = N denoiser passes per step "
            "(N times slower than Merge). Adapters run in bypass mode: no weight re-patching between passes.",
            [],
            " Cost grows with their number: each adapter adds one denoiser pass per step.",
        )

    @classmethod
    def execute(cls, model, adapters) -> io.NodeOutput:
        return io.NodeOutput(compose(model, adapters, "composite"))


NODES = [
    MetaLoRAAdapterIdentity,
    MetaLoRAAdapterLoRA,
    MetaLoRAComposeMerge,
    MetaLoRAComposeSwitch,
    MetaLoRAComposeComposite,
]
