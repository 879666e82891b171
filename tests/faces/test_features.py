"""Optional CLIP-T / CLIP-I / DINO from LOCAL transformers folders (tiny random configs saved here)."""

from __future__ import annotations

import numpy as np
import pytest

from metalora_core.faces.features import feature_scores, load_feature_models

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def feature_dirs(tmp_path_factory):
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("features")
    text = dict(
        vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    text.update(max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision.update(image_size=32, patch_size=8)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    clip.save_pretrained(root / "clip")
    clip.save_pretrained(root / "clip_no_tokenizer")
    CLIPTokenizer().save_pretrained(root / "clip")  # bos/eos/pad only: every word is <unk>, enough to run
    dino_cfg = dict(vision, num_hidden_layers=1)  # the same tiny ViT sizes as CLIP's vision tower
    dino = Dinov2Model(Dinov2Config(**dino_cfg))
    dino.save_pretrained(root / "dino")
    return root


def _images(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(n)]


def test_clip_and_dino_scores(feature_dirs):
    models = load_feature_models(clip=feature_dirs / "clip", dino=feature_dirs / "dino")
    assert set(models) == {"clip", "dino", "skipped"} and models["skipped"] == {}
    gen, real = _images(2, 0), _images(3, 1)
    scores = feature_scores(models, gen, real, real[0], prompt="a photo of a person")
    for key in ("clip_t", "clip_i", "clip_i_ref", "dino", "dino_ref"):
        assert -1.0 <= scores[key] <= 1.0
    # CLIP-I by hand with the same embeddings
    clip = models["clip"]
    expected = float(np.mean(clip.image_embeddings(gen) @ clip.image_embeddings(real).T))
    assert scores["clip_i"] == pytest.approx(expected, abs=1e-9)
    same = feature_scores(models, real[:1], real[:1], None)
    assert same["clip_i"] == pytest.approx(1.0, abs=1e-6) and same["dino"] == pytest.approx(1.0, abs=1e-6)


def test_missing_folders_and_tokenizer_are_skipped_with_reasons(feature_dirs, tmp_path):
    models = load_feature_models(clip=feature_dirs / "clip_no_tokenizer", dino=tmp_path / "nothing")
    assert "dino" not in models and "no config.json" in models["skipped"]["dino"]
    scores = feature_scores(models, _images(1, 0), _images(1, 1), None, prompt="x")
    assert "clip_i" in scores and "clip_t" not in scores
    assert "tokenizer" in scores["skipped"]["clip_t"] and "dino" in scores["skipped"]
    assert (
        "no prompt"
        in feature_scores(load_feature_models(clip=feature_dirs / "clip"), _images(1, 0), [], None)[
            "skipped"
        ]["clip_t"]
    )


def _unit_rows(x):
    x = x if hasattr(x, "detach") else x.pooler_output  # transformers 5 returns an output object
    x = np.asarray(x.detach().float().numpy(), np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_every_score_is_the_mean_cosine_of_the_right_embeddings(feature_dirs):
    """Each number against the raw transformers outputs: CLIP image/text features, DINO's CLS token."""
    import torch

    models = load_feature_models(clip=feature_dirs / "clip", dino=feature_dirs / "dino")
    gen, real, ref = _images(2, 0), _images(3, 1), _images(1, 2)[0]
    scores = feature_scores(models, gen, real, ref, prompt="a photo of a person")
    clip, dino = models["clip"], models["dino"]
    with torch.no_grad():
        c_img = lambda imgs: _unit_rows(clip.model.get_image_features(pixel_values=clip.pixels(imgs)))  # noqa: E731
        tokens = clip.tokenizer(["a photo of a person"], return_tensors="pt")
        c_txt = _unit_rows(clip.model.get_text_features(**tokens))[0]
        d_img = lambda imgs: _unit_rows(dino.model(pixel_values=dino.pixels(imgs)).last_hidden_state[:, 0])  # noqa: E731
        g_c, r_c, ref_c, g_d, r_d, ref_d = (
            c_img(gen),
            c_img(real),
            c_img([ref]),
            d_img(gen),
            d_img(real),
            d_img([ref]),
        )
    expected = {
        "clip_t": np.mean(g_c @ c_txt),
        "clip_i": np.mean(g_c @ r_c.T),
        "clip_i_ref": np.mean(g_c @ ref_c.T),
        "dino": np.mean(g_d @ r_d.T),
        "dino_ref": np.mean(g_d @ ref_d.T),
    }
    for key, value in expected.items():
        assert scores[key] == pytest.approx(float(value), abs=1e-6), key
    assert len({round(v, 6) for v in expected.values()}) == 5  # five different numbers: no mix-up can hide


def test_r_facesim_feature_scores_leave_the_personalization_photo_out(feature_dirs, analyzer, astronaut):
    """CLIP-I / DINO inside R-FaceSim use the real photos WITHOUT the personalization photo, as R-FaceSim."""
    from metalora_core.dev.tiny_faces import paint_markers
    from metalora_core.faces import r_facesim

    face = lambda img: paint_markers(np.ascontiguousarray(img), [((288, 128), 128)])  # noqa: E731
    refs = [face(astronaut), face(astronaut[:, ::-1]), face(astronaut // 2 + 60)]
    gens = [face(astronaut[::-1])]
    models = load_feature_models(clip=feature_dirs / "clip", dino=feature_dirs / "dino")
    res = r_facesim(analyzer, gens, refs, exclude=0, feature_models=models, pixel_metrics=False)
    without = feature_scores(models, gens, refs[1:], refs[0])
    with_ref = feature_scores(models, gens, refs, refs[0])
    for key in ("clip_i", "clip_i_ref", "dino", "dino_ref"):
        assert res.extras[key] == pytest.approx(without[key], abs=1e-9), key
    assert abs(with_ref["clip_i"] - without["clip_i"]) > 1e-6  # including it would change the number
