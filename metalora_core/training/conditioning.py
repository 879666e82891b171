"""Text conditioning for standalone training: a precomputed file, or FLUX's own text encoders read offline
from a diffusers pipeline folder (``text_encoder/`` CLIP-L + ``tokenizer/``, ``text_encoder_2/`` T5-XXL +
``tokenizer_2/``, as FLUX.1-dev ships). Nothing is ever downloaded."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import MetaLoRAError
from ..safeio import load_tensors, save_tensors
from ..targets import FluxDims
from .protocol import TextConditioning

FORMAT_CONDITIONING = "metalora.conditioning"
# T5 length: at least 256 tokens (padding), as ComfyUI's FLUX text encoding gives every short prompt, so an
# identity trains on the text length it is used with in ComfyUI; longer prompts keep their length up to
# FLUX.1-dev's max_sequence_length of 512. Padding to 512 always (the diffusers pipeline's default) would
# cost ~1.2x per step at 512 px and 2-9x on small images for nothing (docs/training.md, bench/text_length.py).
T5_MIN_TOKENS = 256
T5_MAX_TOKENS = 512
CLIP_MAX_TOKENS = 77


def save_conditioning(
    path: str | os.PathLike, cond: TextConditioning, metadata: Mapping[str, object] | None = None
) -> Path:
    tensors = {"context": cond.context}
    if cond.pooled is not None:
        tensors["pooled"] = cond.pooled
    return save_tensors(path, tensors, {"format": FORMAT_CONDITIONING, **(metadata or {})})


def load_conditioning(path: str | os.PathLike, dims: FluxDims | None = None) -> TextConditioning:
    """Read ``context`` ``(tokens, ctx)`` and optional ``pooled`` ``(vec,)``; check them against the model."""
    tensors, _ = load_tensors(path)
    if "context" not in tensors:
        raise MetaLoRAError(
            f"{path}: no 'context' tensor (tokens x context_dim); write it with the T5 features"
        )
    cond = TextConditioning(tensors["context"].float(), tensors.get("pooled"))
    if cond.context.ndim != 2 or (cond.pooled is not None and cond.pooled.ndim != 1):
        raise MetaLoRAError(f"{path}: 'context' must be (tokens, dim) and 'pooled' (dim,)")
    if dims is not None:
        if cond.context.shape[1] != dims.context_dim:
            raise MetaLoRAError(
                f"{path}: context width {cond.context.shape[1]} does not fit the model's {dims.context_dim}"
            )
        if dims.vec_dim and (cond.pooled is None or cond.pooled.shape[0] != dims.vec_dim):
            got = None if cond.pooled is None else cond.pooled.shape[0]
            raise MetaLoRAError(f"{path}: 'pooled' must have {dims.vec_dim} values for this model, got {got}")
    if cond.pooled is not None:
        cond.pooled = cond.pooled.float()
    return cond


def text_encoder_family(folder: str | os.PathLike) -> str | None:
    """Which family's text encoders a pipeline folder holds: ``flux`` (CLIP + T5 in text_encoder/,
    text_encoder_2/ and their tokenizers), ``qwen_image`` (Qwen2.5-VL in text_encoder/ + tokenizer/) or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if all((folder / sub).is_dir() for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")):
        return "flux"
    config = folder / "text_encoder" / "config.json"
    if config.is_file() and (folder / "tokenizer").is_dir():
        try:
            model_type = str(json.loads(config.read_text()).get("model_type", ""))
        except (OSError, ValueError):
            return None
        return "qwen_image" if model_type.startswith("qwen2") else None
    return None


def has_text_encoders(folder: str | os.PathLike) -> bool:
    return text_encoder_family(folder) is not None


def t5_length(tokenizer, prompt: str) -> int:
    """The T5 sequence length of ``prompt``: its own tokens, at least 256, at most 512."""
    n = len(tokenizer(prompt, truncation=True, max_length=T5_MAX_TOKENS).input_ids)
    return max(T5_MIN_TOKENS, min(n, T5_MAX_TOKENS))


def encode_prompt(
    folder: str | os.PathLike,
    prompt: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TextConditioning:
    """Encode ``prompt`` with the pipeline folder's text encoders, local files only: FLUX's CLIP (pooled)
    and T5 (context), or Qwen-Image's Qwen2.5-VL (context only)."""
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    folder = Path(folder)
    if text_encoder_family(folder) == "qwen_image":
        return encode_qwen_prompt(folder, prompt, device, dtype)
    if not has_text_encoders(folder):
        raise MetaLoRAError(
            f"{folder}: no FLUX text encoders (needs text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ "
            "as in the FLUX.1-dev repository); or pass --conditioning with precomputed features"
        )
    try:
        clip_tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
        t5_tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer_2"), local_files_only=True)
        clip = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True, dtype=dtype)
        t5 = T5EncoderModel.from_pretrained(
            str(folder / "text_encoder_2"), local_files_only=True, dtype=dtype
        )
    except (OSError, ValueError) as exc:
        raise MetaLoRAError(f"{folder}: could not load the text encoders offline ({exc})") from None
    with torch.no_grad():
        ids = clip_tok(
            prompt, padding="max_length", max_length=CLIP_MAX_TOKENS, truncation=True, return_tensors="pt"
        )
        pooled = clip.to(device)(ids.input_ids.to(device), output_hidden_states=False).pooler_output[0]
        del clip
        length = t5_length(t5_tok, prompt)
        ids = t5_tok(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        context = t5.to(device)(ids.input_ids.to(device), output_hidden_states=False)[0][0]
    return TextConditioning(context.float().cpu(), pooled.float().cpu())


def encode_qwen_prompt(
    folder: Path, prompt: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> TextConditioning:
    """Qwen-Image's prompt features exactly as ``QwenImagePipeline.encode_prompt`` makes them (its chat
    template, the template's tokens dropped, the last hidden states), with only the text encoder loaded."""
    from diffusers import QwenImagePipeline

    try:
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    except ImportError:
        raise MetaLoRAError(
            "reading Qwen-Image's text encoder (Qwen2.5-VL) needs transformers >= 4.49: pip install -U transformers"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
        encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(folder / "text_encoder"), local_files_only=True, dtype=dtype
        )
    except (OSError, ValueError) as exc:
        raise MetaLoRAError(f"{folder}: could not load the Qwen2.5-VL text encoder offline ({exc})") from None
    pipe = QwenImagePipeline(None, None, encoder.to(device).eval(), tokenizer, None)
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompt, device=torch.device(device))
    keep = mask[0].bool() if mask is not None else torch.ones(embeds.shape[1], dtype=torch.bool)
    return TextConditioning(embeds[0][keep.to(embeds.device)].float().cpu())
