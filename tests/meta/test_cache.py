"""Each photo is encoded once: latents and text features come back from the disk cache on the next run,
and the cache key follows the content and the settings."""

from __future__ import annotations

import torch

from metalora_core.meta import cache as cache_mod
from metalora_core.meta.dataset import load_identity_set
from metalora_core.meta.prepare import prepare
from metalora_core.meta.sampler import plan_buckets
from metalora_core.training.protocol import TextConditioning


def _fake_encoder(calls: list[int]):
    def encode(images: torch.Tensor) -> torch.Tensor:
        calls.append(images.shape[0])
        b, _, h, w = images.shape
        return images.mean(1, keepdim=True).expand(b, 16, h, w)[:, :, ::8, ::8].contiguous()

    return encode


def test_latents_are_encoded_once_and_a_warm_cache_never_loads_the_vae(meta_assets, tmp_path):
    data = load_identity_set(meta_assets["data"])
    plan = plan_buckets([it.size for it in data.items], 128, 2, 0.5)
    loads, calls = [], []

    def load_vae():
        loads.append(1)
        return _fake_encoder(calls)

    cond = TextConditioning(torch.zeros(2, 64))
    first = prepare(data, plan, lambda i: i % 2 == 0, load_vae, "fake", lambda c: cond, tmp_path)
    owned = [i for i in plan.bucket_of() if data.items[i].identity % 2 == 0]
    assert loads == [1] and sum(calls) == len(owned) == len(first.latents)
    again = prepare(data, plan, lambda i: i % 2 == 0, load_vae, "fake", lambda c: cond, tmp_path)
    assert loads == [1] and sum(calls) == len(owned)  # nothing re-encoded, VAE not loaded again
    for i in owned:
        assert torch.equal(first.latents[i], again.latents[i])
        size = plan.bucket_of()[i]
        assert first.latents[i].shape == (16, size[1] // 8, size[0] // 8)
    other = prepare(data, plan, lambda i: i % 2 == 0, load_vae, "other-vae", lambda c: cond, tmp_path)
    assert loads == [1, 1] and len(other.latents) == len(owned)  # another encoder: another key
    assert set(first.captions.values()) == {"photo of a person", "photo of a man", "photo of a woman"}


def test_text_features_are_encoded_once_per_caption(monkeypatch, tmp_path):
    seen = []

    def fake_encode(folder, prompt, device="cpu"):
        seen.append(prompt)
        return TextConditioning(torch.full((3, 8), float(len(prompt))), torch.ones(4))

    monkeypatch.setattr(cache_mod, "encode_prompt", fake_encode)
    a = cache_mod.cached_conditioning("photo of a man", tmp_path / "pipe", tmp_path / "cache")
    b = cache_mod.cached_conditioning("photo of a man", tmp_path / "pipe", tmp_path / "cache")
    c = cache_mod.cached_conditioning("photo of a woman", tmp_path / "pipe", tmp_path / "cache")
    assert seen == ["photo of a man", "photo of a woman"]
    assert torch.equal(a.context, b.context) and torch.equal(a.pooled, b.pooled)
    assert not torch.equal(a.context, c.context)
