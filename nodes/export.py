"""MetaLoRAExportLoRA: fold an identity into a standard kohya-format LoRA in ``models/loras``."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..metalora_core.formats import check_pair, export_lora
from .comfy_folders.model_folders import loras_dir
from .files import target_path
from .types import CATEGORY, IdentityType, LoMDType, strength_input

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def lora_file_inputs(dtype_tooltip: str) -> list:
    """The dtype and overwrite inputs of every node writing a LoRA into models/loras."""
    return [
        io.Combo.Input("dtype", options=list(DTYPES), default="fp32", tooltip=dtype_tooltip),
        io.Boolean.Input(
            "overwrite",
            default=False,
            tooltip="Replace an existing LoRA of the same name (otherwise the node stops with an error).",
        ),
    ]


class MetaLoRAExportLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MetaLoRAExportLoRA",
            display_name="Export Meta-LoRA as standard LoRA",
            category=f"{CATEGORY}/io",
            description=(
                "Folds LoMD + identity exactly into a rank-4 standard LoRA (kohya / ComfyUI key names: "
                "lora_up = scale * Up @ Mid, lora_down = Down) and writes it into models/loras, so the stock "
                "'Load LoRA' (LoraLoaderModelOnly) node, kohya tools and other UIs give the same model as "
                "'Apply Meta-LoRA Identity'."
            ),
            is_output_node=True,
            inputs=[
                LoMDType.Input("lomd", tooltip="The LoMD the identity was trained with."),
                IdentityType.Input("identity", tooltip="The identity adapter to export."),
                io.String.Input(
                    "filename",
                    default="metalora_identity",
                    tooltip="LoRA file name without extension, written to models/loras/<filename>.safetensors.",
                ),
                strength_input(
                    "Strength baked into the LoRA (then load it at strength 1.0 to match Apply at this strength)."
                ),
                *lora_file_inputs("fp32 is exact; bf16 / fp16 halve the file at about 3 significant digits."),
            ],
            outputs=[
                io.String.Output(
                    display_name="lora_name",
                    tooltip="The name to pick in Load LoRA (relative to models/loras).",
                )
            ],
        )

    @classmethod
    def execute(cls, lomd, identity, filename, strength, dtype, overwrite) -> io.NodeOutput:
        check_pair(lomd, identity)
        folder = loras_dir()
        path = target_path(folder, filename, overwrite)
        # kohya names are the canonical names (FLUX.1's BFL modules, Qwen-Image's own): no diffusers slicing,
        # so no model sizes are needed; the family comes from the layer names
        export_lora(path, lomd, identity, None, "kohya", float(strength), DTYPES[dtype])
        name = path.relative_to(folder.resolve()).as_posix()
        return io.NodeOutput(name, ui=ui.PreviewText(f"wrote {path} (load it as '{name}')"))
