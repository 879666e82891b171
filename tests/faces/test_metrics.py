"""R-FaceSim math, reference exclusion, no-face failures, percentage, diversity, PSNR/SSIM."""

from __future__ import annotations

import numpy as np
import pytest

from metalora_core.dev.tiny_faces import paint_markers
from metalora_core.errors import MetaLoRAError
from metalora_core.faces import (
    COLLAPSE_FACE_DISTANCE,
    diversity,
    psnr,
    r_facesim,
    r_facesim_from_embeddings,
    ssim,
    threshold_for,
    to_percent,
)
from metalora_core.faces.pixels import pixel_diversity


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def test_r_facesim_matches_hand_computation():
    g1, g2 = _unit([1, 0, 0]), _unit([1, 1, 0])
    r1, r2 = _unit([1, 0, 1]), _unit([0, 1, 0])
    ref = _unit([2, 1, 0])
    res = r_facesim_from_embeddings([g1, None, g2], np.stack([r1, r2]), ref, model="antelopev2")
    # by hand: cos(g1, r1) = 1/sqrt2, cos(g1, r2) = 0; cos(g2, r1) = 1/2, cos(g2, r2) = 1/sqrt2
    v1 = (1 / np.sqrt(2) + 0) / 2
    v2 = (0.5 + 1 / np.sqrt(2)) / 2
    assert res.per_image == [pytest.approx(v1, abs=1e-12), None, pytest.approx(v2, abs=1e-12)]
    assert res.score == pytest.approx((v1 + v2) / 2, abs=1e-12)
    assert res.score_with_failures == pytest.approx((v1 + v2) / 3, abs=1e-12)
    assert (res.no_face, res.total, res.no_face_rate) == (1, 3, pytest.approx(1 / 3))
    f1, f2 = 2 / np.sqrt(5), 3 / np.sqrt(10)  # cos(g1, ref), cos(g2, ref)
    assert res.facesim_ref == pytest.approx((f1 + f2) / 2, abs=1e-12)
    assert res.copy_gap == pytest.approx(res.facesim_ref - res.score, abs=1e-12)
    assert res.images[0].per_reference == [pytest.approx(1 / np.sqrt(2)), pytest.approx(0.0, abs=1e-15)]
    assert (
        res.threshold == 0.32 and res.verdict == "same person" and res.percent == to_percent(res.score, 0.32)
    )
    assert "1 of 3 generated images have no detectable face" in res.report()
    d = res.to_dict()
    assert d["no_face"] == 1 and d["per_image"][1] is None and d["no_face_rate"] == pytest.approx(1 / 3)


def test_no_references_is_an_error():
    with pytest.raises(MetaLoRAError, match="at least one real photo"):
        r_facesim_from_embeddings([_unit([1, 0])], np.zeros((0, 2)))


def test_percent_mapping_and_thresholds():
    t = threshold_for("buffalo_l")
    assert t == 0.45 and threshold_for("antelopev2") == 0.32 and threshold_for("something") == 0.32
    assert to_percent(-0.3, t) == 0 and to_percent(0.0, t) == 0 and to_percent(1.0, t) == 100
    assert to_percent(t, t) == pytest.approx(50) and to_percent(t / 2, t) == pytest.approx(25)
    assert to_percent((1 + t) / 2, t) == pytest.approx(75) and to_percent(None, t) is None


def test_diversity_and_collapse_warning():
    a, b, c = _unit([1, 0]), _unit([0, 1]), _unit([1, 1])
    d = diversity(np.stack([a, b, c]))
    expected = np.mean([1 - 0, 1 - 1 / np.sqrt(2), 1 - 1 / np.sqrt(2)])
    assert d.face_distance == pytest.approx(expected) and d.pairs == 3 and not d.collapse
    same = diversity(np.stack([a, _unit([1, 0.01]), a]), pixel_distance=0.01)
    assert (
        same.collapse and "feature collapse" in same.warning and same.face_distance < COLLAPSE_FACE_DISTANCE
    )
    assert diversity(np.stack([a])).face_distance is None
    img = np.zeros((8, 8, 3), np.uint8)
    assert pixel_diversity([img, img + 255]) == pytest.approx(1.0) and pixel_diversity([img]) is None


@pytest.fixture(scope="module")
def photos(astronaut, t1):
    """Four 'real photos' of one identity and three generations (one without a face)."""
    face = lambda img, c=(288, 128): paint_markers(img, [(c, 128)])  # noqa: E731
    refs = [face(astronaut), face(np.ascontiguousarray(astronaut[:, ::-1])), face(astronaut // 2 + 60)]
    refs.append(face(np.roll(astronaut, 25, axis=1)))
    gens = [face(np.ascontiguousarray(astronaut[::-1])), astronaut, face(astronaut // 3 + 100, (256, 256))]
    return refs, gens


def test_reference_is_excluded_by_index_path_content_and_embedding(analyzer, photos, tmp_path):
    from PIL import Image

    refs, gens = photos
    emb = lambda img: analyzer.face(img).embedding.astype(np.float64)  # noqa: E731
    g = [emb(gens[0]), emb(gens[2])]
    hand = np.mean([np.mean([gi @ emb(r) for r in refs[1:]]) for gi in g])
    with_ref = np.mean([np.mean([gi @ emb(r) for r in refs]) for gi in g])
    assert abs(hand - with_ref) > 1e-3  # excluding it really changes the number

    by_index = r_facesim(analyzer, gens, refs, exclude=0)
    assert by_index.score == pytest.approx(hand, abs=1e-6)
    assert by_index.references_excluded == ["references[0]"] and len(by_index.references_used) == 3
    assert by_index.facesim_ref == pytest.approx(np.mean([gi @ emb(refs[0]) for gi in g]), abs=1e-6)

    paths = []
    for i, r in enumerate(refs):
        paths.append(tmp_path / f"ref{i}.png")
        Image.fromarray(r).save(paths[-1])
    by_path = r_facesim(analyzer, gens, paths, exclude=paths[0])
    assert by_path.score == pytest.approx(hand, abs=1e-6) and by_path.references_excluded == ["ref0.png"]
    copy = tmp_path / "elsewhere.png"
    Image.fromarray(refs[0]).save(copy)
    by_content = r_facesim(analyzer, gens, paths, exclude=copy)  # same pixels, other file
    assert by_content.score == pytest.approx(hand, abs=1e-6) and by_content.references_excluded == [
        "ref0.png"
    ]
    touched = refs[0].copy()
    touched[500, 500] = 0  # one pixel off (a re-encode): another hash, the same face embedding
    by_embedding = r_facesim(analyzer, gens, refs, exclude=touched)
    assert by_embedding.score == pytest.approx(hand, abs=1e-6) and by_embedding.references_excluded == [
        "references[0]"
    ]

    plain = r_facesim(analyzer, gens, refs)
    assert plain.score == pytest.approx(with_ref, abs=1e-6) and any(
        "no personalization photo" in w for w in plain.warnings
    )


def test_faceless_generations_are_counted_not_dropped(analyzer, photos):
    refs, gens = photos
    res = r_facesim(analyzer, gens, refs, exclude=0)
    assert res.total == 3 and res.no_face == 1 and res.score is not None
    assert res.per_image[1] is None and not res.images[1].face and "no face found" in res.images[1].note
    assert res.score_with_failures == pytest.approx(res.score * 2 / 3)
    assert len(res.extras["psnr_ref"]) == 3 and res.diversity.pixel_distance > 0
    assert "NO FACE" in res.report() and res.badge() == {
        "score": res.score,
        "percent": res.percent,
        "no_face": 1,
        "total": 3,
        "verdict": res.verdict,
    }


def test_all_faceless_references_is_a_clear_error(analyzer, astronaut, photos):
    _, gens = photos
    with pytest.raises(MetaLoRAError, match="no face: references\\[0\\]"):
        r_facesim(analyzer, gens, [astronaut])
    with pytest.raises(MetaLoRAError, match="outside the 1 references"):
        r_facesim(analyzer, gens, [astronaut], exclude=4)


def test_psnr_ssim_against_skimage(astronaut):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(1)
    noisy = np.clip(astronaut.astype(int) + rng.integers(-30, 30, astronaut.shape), 0, 255).astype(np.uint8)
    assert psnr(noisy, astronaut) == pytest.approx(
        peak_signal_noise_ratio(astronaut, noisy, data_range=255), abs=1e-9
    )
    assert psnr(astronaut, astronaut) == float("inf")
    lum = lambda im: im.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    expected = structural_similarity(
        lum(astronaut),
        lum(noisy),
        data_range=255,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert ssim(noisy, astronaut) == pytest.approx(expected, abs=1e-6)
    assert ssim(astronaut, astronaut) == pytest.approx(1.0)
    assert psnr(noisy[::2, ::2], astronaut) < 40  # another size is resized to the reference's


def test_comfyui_image_batches(analyzer, photos):
    """The R-FaceSim node passes IMAGE tensors (B, H, W, C) float in [0, 1]: same numbers as uint8 lists."""
    import torch

    refs, gens = photos
    as_batch = lambda imgs: torch.from_numpy(np.stack(imgs).astype(np.float32) / 255.0)  # noqa: E731
    from_tensors = r_facesim(analyzer, as_batch(gens), as_batch(refs), exclude=0)
    from_lists = r_facesim(analyzer, gens, refs, exclude=0)
    assert from_tensors.score == pytest.approx(from_lists.score, abs=1e-6)
    assert from_tensors.no_face == 1 and from_tensors.images[0].name == "generated[0]"
