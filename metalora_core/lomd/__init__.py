"""Where a LoMD comes from when nobody meta-trained one: seeded (no prior) or distilled from LoRAs.

See docs/lomd-sources.md. Meta-training (the paper's way) lives in :mod:`metalora_core.meta`.
"""
