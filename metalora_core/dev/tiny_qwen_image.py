"""Tiny Qwen-Image transformers and VAE with random weights, written at run time for tests and benches.

Two sizes: :data:`TINY_QWEN_DIMS` (any width diffusers builds: fast math tests) and
:data:`COMFY_QWEN_DIMS`, ComfyUI's fixed width (24 heads of 128, Qwen2.5-VL's 3584-wide text) with ONE
block: ComfyUI detects a Qwen-Image file from its tensor names and reads only the depth and input channels
from it, so a file it loads must have the real width. The weights are diffusers' own initialisation under a
seed; the names are diffusers' ``QwenImageTransformer2DModel`` names, which ComfyUI's model uses too.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..model_files import save_diffusers_config
from ..models.qwen_image import QwenImageDims, diffusers_config_for
from ..safeio import save_tensors

TINY_QWEN_DIMS = QwenImageDims(
    hidden=64, mlp_hidden=256, depth=2, in_channels=16, context_dim=48, out_channels=16, head_dim=32
)
COMFY_QWEN_DIMS = QwenImageDims(
    hidden=3072, mlp_hidden=12288, depth=1, in_channels=16, context_dim=3584, out_channels=16
)


def tiny_qwen_image(dims: QwenImageDims = TINY_QWEN_DIMS, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``QwenImageTransformer2DModel`` of these sizes with seeded random weights (output layer included,
    which diffusers would leave at its default init: a zero output would hide every convention error)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**diffusers_config_for(dims))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))  # RMSNorm scales near 1
            elif p.ndim == 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def write_tiny_qwen_image(
    out: str | os.PathLike,
    dims: QwenImageDims = TINY_QWEN_DIMS,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    layout: str = "file",
) -> Path:
    """Write a tiny Qwen-Image as one ``.safetensors`` file (ComfyUI's ``diffusion_models`` layout) or as a
    diffusers transformer folder (``layout="diffusers"``: config.json + weights)."""
    out = Path(out)
    sd = {k: v.to(dtype).contiguous() for k, v in tiny_qwen_image(dims, seed).state_dict().items()}
    if layout == "diffusers":
        out.mkdir(parents=True, exist_ok=True)
        save_tensors(out / "diffusion_pytorch_model.safetensors", sd, {"format": "pt"})
        save_diffusers_config(out, dims)
        return out
    return save_tensors(out, sd, {"format": "pt"})


def tiny_qwen_vae(seed: int = 0):
    """A tiny ``AutoencoderKLQwenImage`` (16 latent channels, 8x downsampling, Qwen-Image's latent stats)."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 2, 2], num_res_blocks=1).eval()


def write_tiny_qwen_vae(out: str | os.PathLike, seed: int = 0) -> Path:
    """A diffusers VAE folder (what ``--vae`` takes) holding :func:`tiny_qwen_vae`."""
    out = Path(out)
    tiny_qwen_vae(seed).save_pretrained(str(out), safe_serialization=True)
    return out


QWEN_WORDS = ["<|im_start|>", "<|im_end|>", "system", "user", "assistant", "Describe", "the", "image", "photo",
              "of", "a", "person", "zkx", "ohwx", "sks", "man", "woman", "in", "garden", ",", ":"]  # fmt: skip


def write_tiny_qwen_pipeline(
    out: str | os.PathLike, dims: QwenImageDims = TINY_QWEN_DIMS, seed: int = 0
) -> Path:
    """A tiny Qwen-Image pipeline folder laid out like Qwen/Qwen-Image's (``transformer/``, ``vae/``,
    ``text_encoder/`` Qwen2.5-VL, ``tokenizer/``; a small word-level vocabulary), random weights, so the
    trainer's text-encoder path runs in tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out = Path(out)
    write_tiny_qwen_image(out / "transformer", dims, seed, layout="diffusers")
    write_tiny_qwen_vae(out / "vae", seed)
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *QWEN_WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>").save_pretrained(
        str(out / "tokenizer")
    )
    text = dict(
        vocab_size=len(vocab), hidden_size=dims.context_dim, intermediate_size=2 * dims.context_dim,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
        rope_scaling={"type": "mrope", "mrope_section": [2, 5, 5]},
    )  # fmt: skip
    vision = dict(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=dims.context_dim,
        fullatt_block_indexes=[0],
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
    encoder.save_pretrained(str(out / "text_encoder"), safe_serialization=True)
    return out
