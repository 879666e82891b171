"""The ComfyExtension listing every node of the pack (imported only by ComfyUI, through the entry point)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .apply import MetaLoRAApply
from .comfy_folders.model_folders import register_model_folders
from .compose import NODES as COMPOSE_NODES
from .export import MetaLoRAExportLoRA
from .faces import MetaLoRAFaceCrop, MetaLoRAFaceSimilarity
from .files import MetaLoRALoadIdentity, MetaLoRALoadLoMD, MetaLoRASaveIdentity
from .lomd_sources import MetaLoRADistillLoMD, MetaLoRASeededLoMD
from .lora_tools import NODES as LORA_TOOL_NODES
from .train_identity import MetaLoRATrainIdentity

NODES: list[type[io.ComfyNode]] = [
    MetaLoRALoadLoMD,
    MetaLoRASeededLoMD,
    MetaLoRADistillLoMD,
    MetaLoRATrainIdentity,
    MetaLoRAApply,
    MetaLoRASaveIdentity,
    MetaLoRALoadIdentity,
    MetaLoRAExportLoRA,
    MetaLoRAFaceCrop,
    MetaLoRAFaceSimilarity,
    *COMPOSE_NODES,
    *LORA_TOOL_NODES,
]


class MetaLoRAExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_model_folders()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_model_folders()  # before any schema lists the folders' files
        return NODES
