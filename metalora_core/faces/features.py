"""Optional CLIP-T, CLIP-I and DINO scores from transformers models in LOCAL folders (offline only).

- CLIP-T: mean cosine between each generated image's CLIP image embedding and the prompt's text embedding
  (prompt following; the paper-style x100 is not applied).
- CLIP-I / DINO: mean cosine between CLIP image / DINOv2 CLS embeddings of generated images and the real
  photos (personalization photo excluded, as R-FaceSim); ``*_ref``: against the personalization photo.
A folder that is missing or not loadable is skipped with its reason (reported), never downloaded.
Preprocessing: shortest side resized to the model's input size (bicubic), centre crop, mean/std from the
folder's ``preprocessor_config.json`` (CLIP / ImageNet defaults otherwise).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import MetaLoRAError
from .images import to_rgb_uint8

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class FeatureModel:
    """A loaded local CLIP or DINOv2 model with its preprocessing."""

    def __init__(self, kind: str, model, size: int, mean, std, tokenizer=None):
        self.kind, self.model, self.size, self.tokenizer = kind, model, size, tokenizer
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def pixels(self, images):
        import torch
        from PIL import Image

        batch = []
        for im in images:
            pil = Image.fromarray(to_rgb_uint8(im))
            scale = self.size / min(pil.size)
            w, h = max(self.size, round(pil.size[0] * scale)), max(self.size, round(pil.size[1] * scale))
            pil = pil.resize((w, h), Image.BICUBIC)
            left, top = (w - self.size) // 2, (h - self.size) // 2
            arr = np.asarray(pil.crop((left, top, left + self.size, top + self.size)), np.float32) / 255.0
            batch.append(((arr - self.mean) / self.std).transpose(2, 0, 1))
        return torch.from_numpy(np.stack(batch))

    def image_embeddings(self, images) -> np.ndarray:
        import torch

        with torch.no_grad():
            pixels = self.pixels(images).to(self.model.dtype)
            if self.kind == "clip":
                out = self.model.get_image_features(pixel_values=pixels)
                out = out if torch.is_tensor(out) else out.pooler_output
            else:
                out = self.model(pixel_values=pixels).last_hidden_state[:, 0]
        return _unit(out.float().numpy())

    def text_embedding(self, prompt: str) -> np.ndarray:
        import torch

        tokens = self.tokenizer([prompt], padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask")
            )
            out = out if torch.is_tensor(out) else out.pooler_output
        return _unit(out.float().numpy())[0]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _preprocessing(folder: Path, default_size: int, mean, std) -> tuple[int, tuple, tuple]:
    cfg_path = folder / "preprocessor_config.json"
    if not cfg_path.is_file():
        return default_size, mean, std
    cfg = json.loads(cfg_path.read_text())
    crop = cfg.get("crop_size", default_size)
    size = crop.get("height", default_size) if isinstance(crop, dict) else int(crop)
    return int(size), tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))


def load_clip(folder: str | os.PathLike) -> FeatureModel:
    """A transformers CLIPModel (and its tokenizer, if the folder has one) from a local folder."""
    from transformers import AutoTokenizer, CLIPModel

    folder, model = _from_folder(CLIPModel, folder, "CLIP")
    tokenizer = None  # without tokenizer files CLIP-I still works and CLIP-T is reported as skipped
    if any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        # (transformers would otherwise build an EMPTY default CLIP tokenizer: meaningless text embeddings)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise MetaLoRAError(f"{folder}: tokenizer files present but unreadable ({exc})") from None
    size, mean, std = _preprocessing(folder, model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD)
    return FeatureModel("clip", model, size, mean, std, tokenizer)


def load_dino(folder: str | os.PathLike) -> FeatureModel:
    """A transformers DINOv2 (or any ViT-like AutoModel with a CLS token) from a local folder."""
    from transformers import AutoModel

    folder, model = _from_folder(AutoModel, folder, "DINOv2")
    default = int(getattr(model.config, "image_size", 224))
    size, mean, std = _preprocessing(folder, min(default, 224), IMAGENET_MEAN, IMAGENET_STD)
    return FeatureModel("dino", model, size, mean, std)


def _from_folder(cls, folder, what: str):
    """(folder, eval-mode model) from a local transformers folder, offline; errors name the folder."""
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise MetaLoRAError(
            f"{what} model folder {folder} has no config.json: put a transformers model folder there "
            "(save_pretrained / a Hugging Face snapshot); nothing is downloaded"
        )
    try:
        return folder, cls.from_pretrained(str(folder), local_files_only=True).eval()
    except Exception as exc:
        raise MetaLoRAError(
            f"{folder}: not a loadable transformers {what} model ({type(exc).__name__}: {exc})"
        ) from None


def load_feature_models(clip: str | None = None, dino: str | None = None) -> dict:
    """{'clip': FeatureModel, 'dino': FeatureModel, 'skipped': {name: reason}} for the folders given."""
    models: dict = {"skipped": {}}
    for key, folder, loader in (("clip", clip, load_clip), ("dino", dino, load_dino)):
        if not folder:
            continue
        try:
            models[key] = loader(folder)
        except MetaLoRAError as exc:
            models["skipped"][key] = str(exc)
    return models


def _mean_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a @ b.T))


def feature_scores(models: dict, generated, real, reference=None, prompt: str | None = None) -> dict:
    """CLIP-T / CLIP-I / DINO numbers (plus ``skipped`` reasons) for the result's ``extras``."""
    out: dict = {"skipped": dict(models.get("skipped", {}))}
    for key in ("clip", "dino"):
        model = models.get(key)
        if model is None:
            continue
        name = "clip_i" if key == "clip" else "dino"
        gen = model.image_embeddings(generated)
        if real:
            out[name] = _mean_cos(gen, model.image_embeddings(real))
        if reference is not None:
            out[name + "_ref"] = _mean_cos(gen, model.image_embeddings([reference]))
        if key == "clip":
            if not prompt:
                out["skipped"]["clip_t"] = "no prompt given"
            elif model.tokenizer is None:
                out["skipped"]["clip_t"] = "the CLIP folder has no tokenizer files"
            else:
                out["clip_t"] = float(np.mean(gen @ model.text_embedding(prompt)))
    if not out["skipped"]:
        del out["skipped"]
    return out
