"""ComfyUI nodes of the Meta-LoRA pack: thin wrappers over ``metalora_core``.

This package file imports nothing, so pure helpers (``nodes.patch_math``) stay importable without ComfyUI;
:mod:`.extension` (imported by the pack's entry point) pulls in the node modules, which need ComfyUI.
"""
