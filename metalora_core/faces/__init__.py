"""Faces and identity metrics over insightface: model folders, detection + embeddings, crops, R-FaceSim.

Public API (stable; the ComfyUI nodes and the trainer call these):

- :func:`load_face_model` / :func:`validate_model`: ``<root>/insightface/models/<name>/`` checked, then loaded.
- :class:`FaceAnalyzer`: ``analyze(image, index) -> ImageFaces``, ``face(image)``, ``analyze_batch``,
  ``embeddings``; images are uint8 / float [0, 1] numpy or torch, (B,) H, W, C, RGB / RGBA / grey.
- :func:`face_crop`, :func:`crop_batch` (a batch, faceless images per ``NO_FACE_MODES``), :func:`whole_image_crop`,
  :func:`soft_face_mask`, :func:`face_box`, :func:`loss_weights`, :func:`downsample_mask`.
- :func:`r_facesim` (images / paths / tensors) and :func:`r_facesim_from_embeddings` -> :class:`FaceSimResult`
  (``score``, ``per_image``, ``no_face``, ``no_face_rate``, ``facesim_ref``, ``percent``, ``threshold``,
  ``verdict``, ``report()``, ``to_dict()``, ``badge()``); :func:`facesim`, :func:`to_percent`.
"""

from .analysis import DEFAULT_DET_SIZES, Face, FaceAnalyzer, ImageFaces, select_face
from .crops import (
    NO_FACE_MODES,
    BatchCrops,
    FaceCrop,
    crop_batch,
    downsample_mask,
    expand_box,
    face_box,
    face_crop,
    loss_weights,
    soft_face_mask,
    whole_image_crop,
)
from .images import as_image_list, image_size, load_image, to_rgb_uint8
from .metrics import (
    COLLAPSE_FACE_DISTANCE,
    COLLAPSE_PIXEL_DISTANCE,
    SAME_PERSON_THRESHOLDS,
    Diversity,
    FaceSimResult,
    ImageScore,
    diversity,
    r_facesim_from_embeddings,
    threshold_for,
    to_percent,
    verdict,
)
from .models import FaceModel, ModelLayout, default_providers, load_face_model, validate_model
from .pixels import pixel_diversity, psnr, ssim
from .scoring import facesim, r_facesim, score_folders


def load_analyzer(root, name: str = "antelopev2", providers=None, **kwargs) -> FaceAnalyzer:
    """Validate + load a face model and wrap it in an analyzer (the one call most users need)."""
    return FaceAnalyzer(load_face_model(root, name, providers), **kwargs)


__all__ = [
    "NO_FACE_MODES",
    "BatchCrops",
    "crop_batch",
    "whole_image_crop",
    "COLLAPSE_FACE_DISTANCE",
    "COLLAPSE_PIXEL_DISTANCE",
    "DEFAULT_DET_SIZES",
    "SAME_PERSON_THRESHOLDS",
    "Diversity",
    "Face",
    "FaceAnalyzer",
    "FaceCrop",
    "FaceModel",
    "FaceSimResult",
    "ImageFaces",
    "ImageScore",
    "ModelLayout",
    "as_image_list",
    "default_providers",
    "diversity",
    "downsample_mask",
    "expand_box",
    "face_box",
    "face_crop",
    "facesim",
    "load_analyzer",
    "load_face_model",
    "image_size",
    "load_image",
    "loss_weights",
    "pixel_diversity",
    "psnr",
    "r_facesim",
    "r_facesim_from_embeddings",
    "score_folders",
    "select_face",
    "soft_face_mask",
    "ssim",
    "threshold_for",
    "to_percent",
    "to_rgb_uint8",
    "validate_model",
    "verdict",
]
