"""Identity metrics: R-FaceSim, FaceSim against the reference, percentage, verdict, batch diversity.

Definitions (cosine similarity of unit ArcFace embeddings, in [-1, 1]):

- **R-FaceSim** (Meta-LoRA, arXiv 2503.22352): for each generated image g with a face,
  ``v_g = mean_r cos(e_g, e_r)`` over the identity's real photos r EXCEPT the personalization photo;
  the score is the mean of ``v_g`` over generated images with a face. Copying the reference photo (pose,
  light, background) therefore cannot inflate it.
- Generated images without a face are failures: counted (``no_face``, ``no_face_rate``) and also folded into
  ``score_with_failures`` where they count as similarity 0, never silently dropped.
- **FaceSim (reference)**: the same mean against the personalization photo alone. ``copy_gap`` =
  FaceSim(reference) - R-FaceSim: a large gap means the output copies the reference rather than the person.
- **Percentage**: piecewise linear in the cosine, anchored on the model's same-person threshold t:
  ``cos <= 0 -> 0 %``, ``cos = t -> 50 %``, ``cos >= 1 -> 100 %`` (linear in between). 50 % is thus exactly
  "at the same-person threshold" for every face model, which makes percentages comparable across models.
- **Diversity**: mean pairwise cosine distance (1 - cos) between generated faces; below
  :data:`COLLAPSE_FACE_DISTANCE` (0.10, i.e. faces more alike than ~0.9 cosine, re-encodes of one image
  typically score > 0.95) the batch is flagged as feature collapse. Pixel diversity (see ``pixels``) below
  :data:`COLLAPSE_PIXEL_DISTANCE` flags the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import MetaLoRAError

# Same-person cosine-similarity thresholds. Sources: deepface (serengil/deepface,
# deepface/config/threshold.py), tuned on LFW: "ArcFace" cosine distance 0.68 -> similarity 0.32 (the
# ArcFace r100 family, as antelopev2's glintr100); "Buffalo_L" cosine distance 0.55 -> similarity 0.45
# (buffalo_l's w600k_r50). Both recognizers are ArcFace (r100 / r50); insightface itself publishes no
# threshold. Unknown models fall back to the ArcFace value.
SAME_PERSON_THRESHOLDS = {"antelopev2": 0.32, "buffalo_l": 0.45}
DEFAULT_THRESHOLD = 0.32
COLLAPSE_FACE_DISTANCE = 0.10
COLLAPSE_PIXEL_DISTANCE = 0.03
DUPLICATE_COSINE = 0.995  # two photos this alike are one photo (re-saved / re-encoded)


def threshold_for(model_name: str) -> float:
    """The same-person cosine threshold documented for a face model name."""
    return SAME_PERSON_THRESHOLDS.get(str(model_name).lower(), DEFAULT_THRESHOLD)


def to_percent(similarity: float | None, threshold: float) -> float | None:
    """Cosine similarity -> percent, piecewise linear through (0, 0 %), (threshold, 50 %), (1, 100 %)."""
    if similarity is None or (isinstance(similarity, float) and math.isnan(similarity)):
        return None
    s = float(similarity)
    if s <= 0:
        return 0.0
    if s >= 1:
        return 100.0
    if s <= threshold:
        return 50.0 * s / threshold
    return 50.0 + 50.0 * (s - threshold) / (1.0 - threshold)


def verdict(similarity: float | None, threshold: float) -> str:
    if similarity is None:
        return "no face"
    return "same person" if similarity >= threshold else "different person"


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarities (float64) between rows of a and rows of b (normalised here, so any scale works)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


@dataclass
class Diversity:
    face_distance: float | None  # mean pairwise 1 - cos over generated faces
    pixel_distance: float | None  # mean pairwise mean |RGB difference| in [0, 1] at 64 x 64
    pairs: int
    collapse: bool
    warning: str = ""


def diversity(embeddings: np.ndarray | None, pixel_distance: float | None = None) -> Diversity:
    """Batch diversity with the feature-collapse flag (thresholds in the module docstring)."""
    rows = (
        []
        if embeddings is None
        else [e for e in np.asarray(embeddings, np.float64) if np.all(np.isfinite(e))]
    )
    face_distance = None
    pairs = 0
    if len(rows) >= 2:
        sims = cosine_matrix(np.stack(rows), np.stack(rows))
        iu = np.triu_indices(len(rows), 1)
        face_distance = float(np.mean(1.0 - sims[iu]))
        pairs = len(iu[0])
    reasons = []
    if face_distance is not None and face_distance < COLLAPSE_FACE_DISTANCE:
        reasons.append(
            f"faces nearly identical (mean distance {face_distance:.3f} < {COLLAPSE_FACE_DISTANCE})"
        )
    if pixel_distance is not None and pixel_distance < COLLAPSE_PIXEL_DISTANCE:
        reasons.append(
            f"images nearly identical (pixel distance {pixel_distance:.3f} < {COLLAPSE_PIXEL_DISTANCE})"
        )
    warning = ("feature collapse: " + "; ".join(reasons)) if reasons else ""
    return Diversity(face_distance, pixel_distance, pairs, bool(reasons), warning)


@dataclass
class ImageScore:
    """One generated image: its R-FaceSim value (None = no face), FaceSim to the reference, per-reference."""

    name: str
    face: bool
    r_facesim: float | None
    facesim_ref: float | None
    per_reference: list[float]
    note: str = ""


@dataclass
class FaceSimResult:
    """Everything a report, the CLI table, the JSON file and the ComfyUI badge need."""

    score: float | None  # R-FaceSim over generated images with a face
    score_with_failures: float | None  # no-face images counted as 0
    per_image: list[float | None]
    images: list[ImageScore]
    no_face: int
    total: int
    facesim_ref: float | None
    copy_gap: float | None
    percent: float | None
    threshold: float
    verdict: str
    model: str
    references_used: list[str]
    references_excluded: list[str]
    references_without_face: list[str] = field(default_factory=list)
    diversity: Diversity | None = None
    extras: dict = field(default_factory=dict)  # CLIP-T / CLIP-I / DINO / PSNR / SSIM when computed
    warnings: list[str] = field(default_factory=list)

    @property
    def no_face_rate(self) -> float:
        return self.no_face / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["no_face_rate"] = self.no_face_rate
        return _finite(out)

    def badge(self) -> dict:
        """The small dict the R-FaceSim node sends to its js badge."""
        return {
            "score": self.score,
            "percent": self.percent,
            "no_face": self.no_face,
            "total": self.total,
            "verdict": self.verdict,
        }

    def report(self) -> str:
        from .report import format_report

        return format_report(self)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def r_facesim_from_embeddings(
    generated: Sequence[np.ndarray | None],
    references: np.ndarray,
    reference: np.ndarray | None = None,
    model: str = "antelopev2",
    threshold: float | None = None,
    names: Sequence[str] | None = None,
    reference_names: Sequence[str] | None = None,
    excluded_names: Sequence[str] = (),
    notes: Sequence[str] | None = None,
) -> FaceSimResult:
    """The metric on embeddings: ``generated`` one row per image (None / NaN row = no face), ``references`` the
    real photos ALREADY WITHOUT the personalization photo, ``reference`` that photo's embedding (optional)."""
    refs = np.asarray(references, np.float64)
    if refs.ndim != 2 or refs.shape[0] == 0:
        raise MetaLoRAError(
            "R-FaceSim needs at least one real photo of the person other than the personalization photo "
            "(with a detectable face)"
        )
    threshold = threshold_for(model) if threshold is None else float(threshold)
    names = list(names) if names is not None else [f"generated[{i}]" for i in range(len(generated))]
    notes = list(notes) if notes is not None else [""] * len(generated)
    images: list[ImageScore] = []
    for i, emb in enumerate(generated):
        if emb is None or not np.all(np.isfinite(np.asarray(emb, np.float64))):
            images.append(ImageScore(names[i], False, None, None, [], notes[i] or "no face"))
            continue
        row = np.asarray(emb, np.float64)[None]
        per_ref = cosine_matrix(row, refs)[0]
        ref_sim = (
            float(cosine_matrix(row, np.asarray(reference, np.float64)[None])[0, 0])
            if reference is not None
            else None
        )
        images.append(ImageScore(names[i], True, float(per_ref.mean()), ref_sim, per_ref.tolist(), notes[i]))
    values = [im.r_facesim for im in images if im.face]
    total = len(images)
    no_face = total - len(values)
    score = _mean(values)
    score_fail = float(np.sum(values) / total) if total else None
    ref_values = [im.facesim_ref for im in images if im.facesim_ref is not None]
    facesim_ref = _mean(ref_values)
    warnings = []
    if no_face:
        warnings.append(
            f"{no_face} of {total} generated images have no detectable face (counted as failures)"
        )
    if reference is None:
        warnings.append(
            "no personalization photo given: FaceSim(reference) and the copy gap are not computed"
        )
    embs = [
        np.asarray(e, np.float64)
        for e in generated
        if e is not None and np.all(np.isfinite(np.asarray(e, np.float64)))
    ]
    return FaceSimResult(
        score=score,
        score_with_failures=score_fail,
        per_image=[im.r_facesim for im in images],
        images=images,
        no_face=no_face,
        total=total,
        facesim_ref=facesim_ref,
        copy_gap=(facesim_ref - score) if (facesim_ref is not None and score is not None) else None,
        percent=to_percent(score, threshold),
        threshold=threshold,
        verdict=verdict(score, threshold),
        model=model,
        references_used=list(reference_names)
        if reference_names is not None
        else [f"reference[{i}]" for i in range(len(refs))],
        references_excluded=list(excluded_names),
        diversity=diversity(np.stack(embs) if embs else None),
        warnings=warnings,
    )
