"""ComfyUI training backend: Meta-LoRA personalization on the FLUX.1 or Qwen-Image model ComfyUI loaded.

``families`` picks the backend from the MODEL's class; ``base`` is what every family's backend shares
(loading, heads on a clone, checkpointing); ``backend`` with ``blocks`` / ``patches`` is FLUX.1's (its
out-of-place block forwards and their registration through ComfyUI's patch API), ``qwen_image`` is
Qwen-Image's. Importing this package (and ``blocks``, ``patches``, ``glue``) needs no ComfyUI; the backends do.
"""
