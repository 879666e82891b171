"""ComfyUI's model folders as the nodes use them (no node is defined here): the folders registered with
``folder_paths`` and which LoRA files a node reads."""
