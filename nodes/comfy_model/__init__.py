"""How the nodes change ComfyUI's MODEL (no node is defined here): the weight adapter ComfyUI patches with,
its math and plan, the bypass and wrapper of composed adapters, and the logical weight shapes (GGUF too)."""
