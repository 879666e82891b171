"""Fixtures for the meta-training tests: a synthetic identity set, a tiny VAE and text features beside the
shared tiny FLUX, and one torch thread per test (2 shared cores: oversubscribed threads only thrash)."""

from __future__ import annotations

import pytest

from metalora_core.dev.conditioning import write_random_conditioning
from metalora_core.dev.synthetic_identities import write_synthetic_identities
from metalora_core.dev.tiny_vae import tiny_vae, write_tiny_vae
from metalora_core.meta.dataset import load_identity_set
from metalora_core.meta.prepare import prepare
from metalora_core.meta.sampler import plan_buckets
from metalora_core.training.conditioning import load_conditioning
from metalora_core.training.diffusers_backend import DiffusersBackend
from metalora_core.training.standalone import vae_encoder

RES, MAX_ASPECT_ERROR = 128, 0.5  # 128 px keeps the latents 16x16; 0.5 lets every synthetic aspect fit


@pytest.fixture(scope="session")
def meta_assets(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    data = write_synthetic_identities(root / "data", identities=6, images=4, size=96)
    vae = write_tiny_vae(root / "vae")
    cond = write_random_conditioning(assets["diffusers"], root / "cond.safetensors", tokens=8)
    return {"root": root, "data": data, "vae": vae, "cond": cond, "flux": assets["diffusers"]}


@pytest.fixture(scope="session")
def meta_backend(meta_assets):
    return DiffusersBackend.from_path(meta_assets["flux"])


@pytest.fixture(scope="session")
def build(meta_assets):
    """``build(batch)``: (data, plan, prepared) of the synthetic set; latents cached on disk per session."""
    return lambda batch, seed=0: _build(meta_assets, batch, seed)


def _build(meta_assets, batch: int, seed: int = 0, owns=lambda identity: True):
    data = load_identity_set(meta_assets["data"])
    plan = plan_buckets([it.size for it in data.items], RES, batch, MAX_ASPECT_ERROR, seed)
    cond = load_conditioning(meta_assets["cond"])
    prepared = prepare(
        data,
        plan,
        owns,
        lambda: vae_encoder(tiny_vae(0)),
        "tiny-vae-seed0",
        lambda caption: cond,
        meta_assets["root"] / "cache",
    )
    return data, plan, prepared
