"""Shared fixtures: tiny FLUX checkpoints, a random LoMD and identity adapter, built at run time."""

from __future__ import annotations

import pytest
import torch

from metalora_core.adapter import AdapterShape
from metalora_core.dev.random_assets import random_adapter, random_lomd
from metalora_core.dev.tiny_flux import TINY_DIMS, write_tiny_flux
from metalora_core.formats import save_identity, save_lomd


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Paths of a tiny BFL FLUX, the same weights as a diffusers folder, a LoMD and an adapter."""
    root = tmp_path_factory.mktemp("assets")
    bfl = write_tiny_flux(root / "tiny_flux.safetensors", "bfl", TINY_DIMS, seed=0)
    diffusers = write_tiny_flux(root / "tiny_flux_diffusers", "diffusers", TINY_DIMS, seed=0)
    lomd = random_lomd(bfl, AdapterShape(4, 8), "attn_mlp", seed=1)
    lomd_path = save_lomd(root / "lomd.safetensors", lomd)
    adapter = random_adapter(lomd, bfl, seed=2, up_std=0.05)
    adapter_path = save_identity(root / "identity.safetensors", adapter)
    return {"root": root, "bfl": bfl, "diffusers": diffusers, "lomd": lomd_path, "adapter": adapter_path}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine spinning threads cost ~10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
