"""Score generated images against an identity's real photos: R-FaceSim from images, files or tensors.

The personalization photo must not count as a "real photo" for R-FaceSim. It is removed from the references
when it is given explicitly (a path, an image or an index into the references) and found among them by
path, by pixel content (same hash after normalisation) or by embedding identity (cosine >=
``DUPLICATE_COSINE``: the same photo re-saved or re-encoded).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import MetaLoRAError
from .analysis import FaceAnalyzer
from .images import as_image_list, content_hash, load_image
from .metrics import DUPLICATE_COSINE, FaceSimResult, diversity, r_facesim_from_embeddings
from .pixels import pixel_diversity, psnr, ssim


def _named_images(items, what: str) -> tuple[list[np.ndarray], list[str], list[Path | None]]:
    """Paths and/or images -> (uint8 RGB images, display names, source paths)."""
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    if isinstance(items, (list, tuple)):
        images, names, paths = [], [], []
        for i, item in enumerate(items):
            if isinstance(item, (str, os.PathLike)):
                images.append(load_image(item))
                names.append(Path(item).name)
                paths.append(Path(item).resolve())
            else:
                images += as_image_list([item], f"{what}[{i}]")
                names.append(f"{what}[{i}]")
                paths.append(None)
        return images, names, paths
    images = as_image_list(items, what)
    return images, [f"{what}[{i}]" for i in range(len(images))], [None] * len(images)


def r_facesim(
    analyzer: FaceAnalyzer,
    generated,
    references,
    exclude=None,
    *,
    face_index: int = 0,
    threshold: float | None = None,
    pixel_metrics: bool = True,
    feature_models: dict | None = None,
    prompt: str | None = None,
) -> FaceSimResult:
    """R-FaceSim of ``generated`` (paths, images, a (B, H, W, C) tensor) against ``references`` (same kinds),
    excluding ``exclude`` (the personalization photo: path, image, or int index into ``references``).

    ``pixel_metrics`` adds PSNR/SSIM vs the personalization photo and pixel diversity; ``feature_models``
    (from :func:`metalora_core.faces.features.load_feature_models`) adds CLIP-T (needs ``prompt``), CLIP-I, DINO.
    """
    gen_imgs, gen_names, _ = _named_images(generated, "generated")
    ref_imgs, ref_names, ref_paths = _named_images(references, "references")
    if not gen_imgs:
        raise MetaLoRAError("no generated images to score")
    if not ref_imgs:
        raise MetaLoRAError("no reference photos given: R-FaceSim needs the person's real photos")

    # the personalization photo: an index, or an image/path matched among the references
    ex_img, ex_name, ex_path = None, None, None
    excluded: set[int] = set()
    if isinstance(exclude, (int, np.integer)) and not isinstance(exclude, bool):
        if not 0 <= exclude < len(ref_imgs):
            raise MetaLoRAError(f"--exclude index {exclude} is outside the {len(ref_imgs)} references")
        excluded.add(int(exclude))
        ex_img, ex_name = ref_imgs[exclude], ref_names[exclude]
    elif exclude is not None:
        imgs, names, paths = _named_images([exclude], "exclude")
        ex_img, ex_name, ex_path = imgs[0], names[0], paths[0]
        ex_hash = content_hash(ex_img)
        for i, (img, path) in enumerate(zip(ref_imgs, ref_paths)):
            if (ex_path is not None and path == ex_path) or content_hash(img) == ex_hash:
                excluded.add(i)

    warnings: list[str] = []
    ex_face = analyzer.analyze(ex_img, face_index).face if ex_img is not None else None
    if ex_img is not None and ex_face is None:
        warnings.append(
            f"the personalization photo {ex_name} has no detectable face: FaceSim(reference) not computed"
        )

    ref_results = [analyzer.analyze(img, face_index) for img in ref_imgs]
    used, used_names, no_face_refs = [], [], []
    for i, res in enumerate(ref_results):
        if i in excluded:
            continue
        if res.face is None:
            no_face_refs.append(ref_names[i])
            continue
        if ex_face is not None and float(np.dot(res.face.embedding, ex_face.embedding)) >= DUPLICATE_COSINE:
            excluded.add(i)  # the same photo, re-encoded
            continue
        used.append(res.face.embedding)
        used_names.append(ref_names[i])
    if no_face_refs:
        warnings.append(f"references without a detectable face (not used): {', '.join(no_face_refs)}")
    if exclude is not None and not excluded:
        warnings.append(
            f"the personalization photo {ex_name} is not among the references (nothing to exclude)"
        )
    if exclude is None:
        warnings.append(
            "no personalization photo given: every reference counts (plain FaceSim, not R-FaceSim)"
        )
    if not used:
        raise MetaLoRAError(
            "R-FaceSim needs at least one real photo of the person with a detectable face OTHER than the "
            f"personalization photo; references: {', '.join(ref_names)}"
            + (f" (excluded: {', '.join(ref_names[i] for i in sorted(excluded))})" if excluded else "")
            + (f" (no face: {', '.join(no_face_refs)})" if no_face_refs else "")
        )

    gen_results = [analyzer.analyze(img, face_index) for img in gen_imgs]
    result = r_facesim_from_embeddings(
        [r.face.embedding if r.face is not None else None for r in gen_results],
        np.stack(used),
        ex_face.embedding if ex_face is not None else None,
        model=analyzer.model.name,
        threshold=threshold,
        names=gen_names,
        reference_names=used_names,
        excluded_names=[ref_names[i] for i in sorted(excluded)],
        notes=[r.note for r in gen_results],
    )
    # the warnings above say more precisely why there is no reference embedding
    result.warnings = warnings + [w for w in result.warnings if not w.startswith("no personalization photo")]

    if pixel_metrics:
        embs = [r.face.embedding for r in gen_results if r.face is not None]
        result.diversity = diversity(np.stack(embs) if embs else None, pixel_diversity(gen_imgs))
        if ex_img is not None:
            result.extras["psnr_ref"] = [psnr(g, ex_img) for g in gen_imgs]
            result.extras["ssim_ref"] = [ssim(g, ex_img) for g in gen_imgs]
    if result.diversity is not None and result.diversity.collapse:
        result.warnings.append(result.diversity.warning)
    if feature_models:
        from .features import feature_scores

        real = [img for i, img in enumerate(ref_imgs) if i not in excluded]
        result.extras.update(feature_scores(feature_models, gen_imgs, real, ex_img, prompt))
    return result


def facesim(analyzer: FaceAnalyzer, image_a, image_b, face_index: int = 0) -> float | None:
    """Cosine similarity of the chosen faces of two images; None if either has no face."""
    a = analyzer.face(image_a, face_index)
    b = analyzer.face(image_b, face_index)
    if a is None or b is None:
        return None
    return float(np.dot(a.embedding.astype(np.float64), b.embedding.astype(np.float64)))


def score_folders(
    analyzer: FaceAnalyzer,
    generated_dir: str | os.PathLike,
    references_dir: str | os.PathLike,
    exclude: str | os.PathLike | None = None,
    **kwargs,
) -> FaceSimResult:
    """The CLI's call: every image of two folders; ``exclude`` a file (inside references or not)."""
    from .images import list_images

    gen = list_images(generated_dir, "generated folder")
    refs = list_images(references_dir, "references folder")
    if exclude is not None and not Path(exclude).is_file():
        raise MetaLoRAError(f"--exclude {exclude}: no such image file")
    return r_facesim(analyzer, gen, refs, exclude, **kwargs)
