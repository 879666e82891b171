"""Fixtures for the trainer tests: the shared tiny diffusers FLUX as a backend, fixed latents and text."""

from __future__ import annotations

import pytest
import torch

from metalora_core.formats import load_lomd
from metalora_core.training.diffusers_backend import DiffusersBackend
from metalora_core.training.protocol import TextConditioning


@pytest.fixture(scope="session")
def backend(assets):
    return DiffusersBackend.from_path(assets["diffusers"])


@pytest.fixture(scope="session")
def backend64(assets):
    return DiffusersBackend.from_path(assets["diffusers"], dtype=torch.float64)


@pytest.fixture(scope="session")
def lomd(assets):
    return load_lomd(assets["lomd"])


@pytest.fixture(scope="session")
def cond():
    g = torch.Generator().manual_seed(5)
    return TextConditioning(torch.randn(8, 64, generator=g), torch.randn(32, generator=g))


@pytest.fixture(scope="session")
def views():
    """Three 8x8 'latents' of one fixed image (a smooth pattern plus small per-view jitter)."""
    g = torch.Generator().manual_seed(7)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    base = torch.stack([torch.sin((c + 1) * xx) * torch.cos((c % 3 + 1) * yy) for c in range(16)])
    return [base + 0.05 * torch.randn(16, 8, 8, generator=g) for _ in range(3)]


@pytest.fixture
def full_float64(monkeypatch):
    """Keep diffusers' FLUX in float64 throughout, for finite differences.

    diffusers computes two things in float32 whatever the model dtype: the RMSNorm variance and the RoPE
    product (``x.float() * cos``). That float32 rounding (~1e-7) swamps a finite-difference quotient, so
    these two are replaced by the same formulas at the input's precision; in float32 they are identical
    to the originals (``test_precision_patch_is_identity_in_float32``). The block code the check is about
    (residual updates, attention, checkpointing) is diffusers' own, untouched.
    """
    from diffusers.models import normalization
    from diffusers.models.transformers import transformer_flux

    def rope(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
        cos, sin = freqs_cis
        shape = (None, None, slice(None), slice(None)) if sequence_dim == 2 else (None, slice(None), None)
        cos, sin = cos[shape].to(x.device), sin[shape].to(x.device)
        x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
        work = torch.promote_types(x.dtype, torch.float32)
        return (x.to(work) * cos + x_rotated.to(work) * sin).to(x.dtype)

    def rms_forward(self, hidden_states):
        work = torch.promote_types(hidden_states.dtype, torch.float32)
        variance = hidden_states.to(work).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        if self.weight is not None:
            if self.weight.dtype in (torch.float16, torch.bfloat16):
                hidden_states = hidden_states.to(self.weight.dtype)
            hidden_states = hidden_states * self.weight
            if self.bias is not None:
                hidden_states = hidden_states + self.bias
        return hidden_states

    assert rms_forward.__code__.co_argcount == normalization.RMSNorm.forward.__code__.co_argcount
    monkeypatch.setattr(transformer_flux, "apply_rotary_emb", rope)
    monkeypatch.setattr(normalization.RMSNorm, "forward", rms_forward)
    yield
