"""A tiny FLUX pipeline folder laid out like FLUX.1-dev's (``transformer/``, ``vae/``, ``text_encoder/`` CLIP,
``text_encoder_2/`` T5, ``tokenizer/``, ``tokenizer_2/``), random weights and a small word-level vocabulary,
so the trainer's pipeline-folder path (text encoders read offline) runs in tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..targets import FluxDims
from .tiny_flux import TINY_DIMS, write_tiny_flux
from .tiny_vae import write_tiny_vae

WORDS = ["photo", "of", "a", "an", "person", "man", "woman", "ohwx", "sks", "in", "the", "garden", ","]


def _tokenizer(folder: Path, max_length: int) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        model_max_length=max_length,
    )
    tok.save_pretrained(str(folder))
    return len(vocab)


def write_tiny_pipeline(out: str | os.PathLike, dims: FluxDims = TINY_DIMS, seed: int = 0) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    out = Path(out)
    write_tiny_flux(out / "transformer", "diffusers", dims, seed)
    write_tiny_vae(out / "vae", seed)
    vocab = _tokenizer(out / "tokenizer", 77)
    _tokenizer(out / "tokenizer_2", 512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab, hidden_size=dims.vec_dim, intermediate_size=2 * dims.vec_dim, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, pad_token_id=0, eos_token_id=2, bos_token_id=2,
            )
        )  # fmt: skip
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=vocab, d_model=dims.context_dim, d_kv=16, d_ff=2 * dims.context_dim, num_layers=1,
                num_heads=2, pad_token_id=0, eos_token_id=2,
            )
        )  # fmt: skip
    clip.save_pretrained(str(out / "text_encoder"), safe_serialization=True)
    t5.save_pretrained(str(out / "text_encoder_2"), safe_serialization=True)
    return out
