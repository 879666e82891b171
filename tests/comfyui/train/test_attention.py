"""Training survives every attention implementation ComfyUI may have chosen globally, and sampling keeps it.

ComfyUI picks its attention once at start-up (``--use-split-cross-attention``, sub-quadratic by default on CPU
and MPS, PyTorch SDPA, ...); these tests install that choice the way start-up does (the module-level
``optimized_attention`` of ComfyUI's FLUX) and fake low free memory through ComfyUI's own
``get_free_memory``, so the implementations take their memory-dependent paths:
- sub-quadratic with ~no free memory chunks the keys and calls ``torch.exp(out=...)`` (not differentiable);
- split with free memory that changes between the forward and the checkpoint recompute slices differently
  (``CheckpointError``).
Tolerance: the losses equal PyTorch attention's to 1e-6 relative (float32 model); with the training override
the computation is the same, so they are in fact identical.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from metalora_core.adapter import AdapterShape
from metalora_core.dev.random_assets import random_lomd
from metalora_core.training.personalize import PersonalizeConfig, personalize
from metalora_core.training.protocol import TextConditioning

TOKENS = 64  # 32 image tokens (16x8 latents) + 32 text tokens: every split slicing (2..64) divides it


@pytest.fixture(scope="module")
def attn(comfy):
    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention

    return comfy.ldm.modules.attention


@pytest.fixture(scope="module")
def lomd(tiny_bfl):
    return random_lomd(tiny_bfl, AdapterShape(4, 8), "attn_mlp", seed=1)


def _train(pack, model, lomd, checkpointing: bool) -> list[float]:
    g = torch.Generator().manual_seed(0)
    dims = pack("comfy_training.backend").flux_dims(model.model.diffusion_model)
    cond = TextConditioning(
        torch.randn(32, dims.context_dim, generator=g), torch.randn(dims.vec_dim, generator=g)
    )
    views = [torch.randn(16, 16, 8, generator=g) for _ in range(2)]
    backend = pack("comfy_training.backend").ComfyFluxBackend(model)
    config = PersonalizeConfig(steps=3, lr=1e-3, warmup_steps=0, seed=4, gradient_checkpointing=checkpointing)
    with torch.inference_mode(False), torch.enable_grad(), backend.session():
        return personalize(backend, lomd, views, cond, config).losses


def _choose(monkeypatch, comfy, attn, name: str, free_bytes) -> None:
    """ComfyUI's global attention choice (as start-up sets it) and what get_free_memory reports."""
    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", attn.get_attention_function(name))
    free = iter(free_bytes)

    def get_free_memory(dev=None, torch_free_too=False):
        value = next(free)
        return (value, value) if torch_free_too else value

    monkeypatch.setattr(comfy.model_management, "get_free_memory", get_free_memory)


def _sampling_forward(model) -> None:
    """One forward of the loaded FLUX as a sampler makes it: no gradients, the MODEL's own options."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.model.diffusion_model(
            torch.randn(1, 16, 16, 8, generator=g),
            torch.tensor([0.5]),
            context=torch.randn(1, 32, 64, generator=g),
            y=torch.randn(1, 32, generator=g),
            guidance=torch.tensor([3.5]),
            transformer_options=dict(model.model_options.get("transformer_options", {})),
        )


@pytest.fixture(scope="module")
def reference(pack, load, tiny_bfl, lomd):
    return _train(pack, load(tiny_bfl, torch.float32), lomd, checkpointing=True)


def test_sub_quadratic_attention_with_little_free_memory(
    comfy, attn, pack, load, tiny_bfl, lomd, reference, monkeypatch
):
    _choose(monkeypatch, comfy, attn, "sub_quad", itertools.repeat(1024))  # 1 KB free: chunked keys
    losses = _train(pack, load(tiny_bfl, torch.float32), lomd, checkpointing=False)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-6, atol=0)


def test_split_attention_under_gradient_checkpointing(
    comfy, attn, pack, load, tiny_bfl, lomd, reference, monkeypatch
):
    # one attention call sees plenty of free memory (1 slice), the next very little (4 slices): the
    # checkpoint recompute of a block never sees what its forward saw
    mem_required = TOKENS * TOKENS * 4 * 3  # what split asks for at 1 head, batch 1, float32
    _choose(monkeypatch, comfy, attn, "split", itertools.cycle([10**12, mem_required // 4]))
    losses = _train(pack, load(tiny_bfl, torch.float32), lomd, checkpointing=True)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-6, atol=0)


def test_sampling_keeps_comfyuis_choice(comfy, attn, pack, load, tiny_bfl, lomd, monkeypatch):
    calls = []

    @attn.wrap_attn
    def chosen(*args, **kwargs):  # stands for whatever ComfyUI chose (sage, split, ...)
        calls.append(1)
        return attn.attention_pytorch(*args, **kwargs)

    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", chosen)
    model = load(tiny_bfl, torch.float32)
    _train(pack, model, lomd, checkpointing=False)
    assert calls == []  # training never ran the global choice
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})
    _sampling_forward(model)
    assert len(calls) == 4  # a sampling forward runs it in each of the 2 double + 2 single blocks


def test_training_attention_never_allows_cudnn_and_sampling_is_untouched(
    comfy, attn, pack, load, tiny_bfl, lomd, monkeypatch
):
    """Inside the real ComfyUI: every SDPA call of the training forward and of its checkpoint recompute runs
    with cuDNN attention switched off (its backward fails on Hopper); a sampling forward is left alone."""
    from tests.sdpa_spy import TRAINING_FLAGS, sdpa_flags

    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(sdpa_flags())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = load(tiny_bfl, torch.float32)
    _train(pack, model, lomd, checkpointing=True)
    blocks = 4  # 2 double + 2 single blocks: one attention each
    assert len(seen) == 3 * 2 * blocks  # 3 steps x (forward + checkpoint recompute) x blocks
    assert set(seen) == {TRAINING_FLAGS}, seen
    seen.clear()  # sampling, with ComfyUI's choice set to its PyTorch attention (on a CPU it is sub-quadratic)
    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", attn.get_attention_function("pytorch"))
    _sampling_forward(model)
    assert seen and all(flags[0] for flags in seen)  # sampling: PyTorch's own switches
