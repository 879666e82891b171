"""ComfyUI training backend: Meta-LoRA personalization on the FLUX model ComfyUI already loaded.

``blocks`` / ``patches`` hold the out-of-place block forwards and their registration through ComfyUI's
patch API; ``backend`` is the ``FluxBackend`` the trainer drives. Importing this package needs no ComfyUI;
``backend`` does.
"""
