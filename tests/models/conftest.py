"""Fixtures for the Qwen-Image family tests: a tiny Qwen-Image (file and diffusers folder), its VAE, a
seeded LoMD and fixed latents / text features, all written at run time."""

from __future__ import annotations

import pytest
import torch

from metalora_core.adapter import AdapterShape
from metalora_core.dev.tiny_qwen_image import TINY_QWEN_DIMS, write_tiny_qwen_image, write_tiny_qwen_vae
from metalora_core.formats import save_lomd
from metalora_core.lomd.seeded import seeded_lomd
from metalora_core.training.diffusers_backend import DiffusersBackend
from metalora_core.training.protocol import TextConditioning


@pytest.fixture(scope="session")
def qwen_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_image")
    lomd = seeded_lomd(TINY_QWEN_DIMS, AdapterShape(4, 8), "attn_mlp", seed=0)
    return {
        "file": write_tiny_qwen_image(root / "tiny_qwen_image.safetensors"),
        "folder": write_tiny_qwen_image(root / "tiny_qwen_image_diffusers", layout="diffusers"),
        "vae": write_tiny_qwen_vae(root / "vae"),
        "lomd": save_lomd(root / "lomd_qwen.safetensors", lomd),
        "root": root,
    }


@pytest.fixture(scope="session")
def qwen_backend(qwen_files):
    return DiffusersBackend.from_path(qwen_files["file"])


@pytest.fixture(scope="session")
def qwen_backend64(qwen_files):
    return DiffusersBackend.from_path(qwen_files["file"], dtype=torch.float64)


@pytest.fixture(scope="session")
def qwen_cond():
    return TextConditioning(
        torch.randn(6, TINY_QWEN_DIMS.context_dim, generator=torch.Generator().manual_seed(5))
    )


@pytest.fixture
def qwen_float64(monkeypatch):
    """diffusers' Qwen-Image applies RoPE in complex64 and RMSNorm's variance in float32 whatever the model
    dtype; for finite differences both run at the input's precision (same formulas; float32 unchanged)."""
    from diffusers.models import normalization
    from diffusers.models.transformers import transformer_qwenimage

    def rope(x, freqs_cis, use_real=True, use_real_unbind_dim=-1):
        assert not use_real, "Qwen-Image applies its RoPE as complex numbers"
        work = torch.promote_types(x.dtype, torch.float32)
        complex_work = torch.complex128 if work == torch.float64 else torch.complex64
        rotated = torch.view_as_complex(x.to(work).reshape(*x.shape[:-1], -1, 2).contiguous())
        out = torch.view_as_real(rotated * freqs_cis.unsqueeze(1).to(complex_work)).flatten(3)
        return out.type_as(x)

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

    monkeypatch.setattr(transformer_qwenimage, "apply_rotary_emb_qwen", rope)
    monkeypatch.setattr(normalization.RMSNorm, "forward", rms_forward)
    yield
