"""ComfyUI entry point of the Meta-LoRA node pack (V3 API). No logic lives here: the nodes are in ``nodes/``,
the library in ``metalora_core/``.

Importing this file never imports ComfyUI (``comfy``), so the pack folder can be imported as a package
without it (pytest, tooling); the node modules are imported only when ComfyUI calls :func:`comfy_entrypoint`.
The nodes reach the library by relative import (``from ..metalora_core import ...``), so the pack works from
``custom_nodes/`` without ``pip install``.
"""

from __future__ import annotations

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    """Called by ComfyUI on start-up: registers the model folders and returns the extension."""
    from .nodes.extension import MetaLoRAExtension

    return MetaLoRAExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
