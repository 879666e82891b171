"""Builders for small, complete test assets (tiny FLUX, random LoMD / adapters, tiny face models)."""
