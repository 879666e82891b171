"""Face Crop and R-FaceSim in a real ComfyUI with the tiny face models (the detector finds magenta frames)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tests.comfyui.harness import node


def _load(name: str) -> dict:
    return node("LoadImage", image=name)


def test_rfacesim_without_a_face_is_a_result_not_a_crash(comfy):
    result = comfy.run(
        {
            "gen": _load("noface.png"),
            "ref": _load("face_b.png"),
            "score": node(
                "MetaLoRAFaceSimilarity", images=["gen", 0], references=["ref", 0], face_model="tiny"
            ),
        }
    )
    assert result.status == "success", result.error
    badge = result.outputs["score"]["metalora_score"][0]
    assert badge["no_face"] == 1 and badge["total"] == 1 and badge["score"] is None
    assert badge["verdict"]
    assert "no" in result.outputs["score"]["text"][0].lower()


def test_rfacesim_excludes_the_personalization_photo_and_matches_the_library(comfy, comfy_base):
    from metalora_core.faces import load_analyzer, load_image

    result = comfy.run(
        {
            "gen": _load("face_a.png"),
            "a": _load("face_a.png"),
            "b": _load("face_b.png"),
            "refs": node("ImageBatch", image1=["a", 0], image2=["b", 0]),
            "score": node(
                "MetaLoRAFaceSimilarity",
                images=["gen", 0],
                references=["refs", 0],
                face_model="tiny",
                personalization_photo=["a", 0],
            ),
        }
    )
    assert result.status == "success", result.error
    badge = result.outputs["score"]["metalora_score"][0]
    assert badge["no_face"] == 0 and badge["total"] == 1
    analyzer = load_analyzer(comfy_base / "models", "tiny", providers=["CPUExecutionProvider"])
    gen = analyzer.face(load_image(comfy_base / "input" / "face_a.png")).embedding
    ref_b = analyzer.face(load_image(comfy_base / "input" / "face_b.png")).embedding
    expected = float(np.dot(gen, ref_b) / (np.linalg.norm(gen) * np.linalg.norm(ref_b)))
    # only face_b counts: face_a (the personalization photo, cosine 1 with the generation) is excluded
    assert abs(badge["score"] - expected) < 1e-4, (badge["score"], expected)
    assert expected < 0.99


def test_face_crop_returns_crop_and_mask(comfy, comfy_base):
    result = comfy.run(
        {
            "img": _load("face_a.png"),
            "crop": node(
                "MetaLoRAFaceCrop", image=["img", 0], face_model="tiny", margin=0.5, size=256, face_index=0
            ),
            "mask_img": node("MaskToImage", mask=["crop", 1]),
            "save": node("SaveImage", images=["crop", 0], filename_prefix="facecrop"),
            "save_mask": node("SaveImage", images=["mask_img", 0], filename_prefix="facemask"),
        }
    )
    assert result.status == "success", result.error
    crop_info = result.outputs["save"]["images"][0]
    mask_info = result.outputs["save_mask"]["images"][0]
    crop = np.asarray(Image.open(comfy_base / "output" / crop_info["subfolder"] / crop_info["filename"]))
    mask = np.asarray(Image.open(comfy_base / "output" / mask_info["subfolder"] / mask_info["filename"]))
    assert crop.shape[:2] == (256, 256) and mask.shape[:2] == (256, 256)
    assert mask[128, 128].max() == 255 and mask[0, 0].max() == 0  # face in the middle, background 0
    # the magenta frame (the tiny detector's face) is inside the crop
    magenta = (crop[..., 0] > 200) & (crop[..., 1] < 60) & (crop[..., 2] > 200)
    assert magenta.mean() > 0.05


def _crop(image: list, size: int, if_no_face: str) -> dict:
    return node(
        "MetaLoRAFaceCrop",
        image=image,
        face_model="tiny",
        margin=0.5,
        size=size,
        face_index=0,
        if_no_face=if_no_face,
    )


def _face_then_faceless(comfy, if_no_face: str):
    """Face Crop over the batch [face_a, noface] in one mode: the run, and the crops, masks and report."""
    return comfy.run(
        {
            "face": _load("face_a.png"),
            "noface": _load("noface.png"),
            "batch": node("ImageBatch", image1=["face", 0], image2=["noface", 0]),
            "crop": _crop(["batch", 0], 256, if_no_face),
            "mask_img": node("MaskToImage", mask=["crop", 1]),
            "save": node("SaveImage", images=["crop", 0], filename_prefix="facecrop_batch"),
            "save_mask": node("SaveImage", images=["mask_img", 0], filename_prefix="facemask_batch"),
            "report": node("PreviewAny", source=["crop", 2]),
        }
    )


def _saved(comfy_base, infos) -> list[np.ndarray]:
    return [np.asarray(Image.open(comfy_base / "output" / i["subfolder"] / i["filename"])) for i in infos]


def test_face_crop_keeps_a_faceless_image_whole_with_a_zero_mask(comfy, comfy_base):
    from metalora_core.faces import load_image, whole_image_crop

    result = _face_then_faceless(comfy, "whole image")
    assert result.status == "success", result.error
    crops = _saved(comfy_base, result.outputs["save"]["images"])
    masks = _saved(comfy_base, result.outputs["save_mask"]["images"])
    assert len(crops) == len(masks) == 2  # the batch keeps its length and order
    assert masks[0].max() == 255 and masks[1].max() == 0  # face found / none: an all-zero mask
    whole = whole_image_crop(load_image(comfy_base / "input" / "noface.png"), 256).image
    assert np.abs(crops[1].astype(int) - whole.astype(int)).max() <= 1  # the image itself, centre square
    assert result.outputs["report"]["text"][0] == (
        "1 of 2 images had a face. No face in image(s) 1 (whole image, zero mask)."
    )


def test_face_crop_skips_a_faceless_image_and_reports_it(comfy, comfy_base):
    result = _face_then_faceless(comfy, "skip")
    assert result.status == "success", result.error
    crops = _saved(comfy_base, result.outputs["save"]["images"])
    masks = _saved(comfy_base, result.outputs["save_mask"]["images"])
    assert len(crops) == len(masks) == 1 and masks[0].max() == 255  # only the face image is left
    magenta = (crops[0][..., 0] > 200) & (crops[0][..., 1] < 60) & (crops[0][..., 2] > 200)
    assert magenta.mean() > 0.05
    assert result.outputs["report"]["text"][0] == "1 of 2 images had a face. No face in image(s) 1 (skipped)."

    # every image skipped: a batch cannot be empty, so the whole images come back and the report says so
    alone = comfy.run(
        {
            "img": _load("noface.png"),
            "crop": _crop(["img", 0], 128, "skip"),
            "save": node("SaveImage", images=["crop", 0], filename_prefix="facecrop_none"),
            "report": node("PreviewAny", source=["crop", 2]),
        }
    )
    assert alone.status == "success", alone.error
    assert [c.shape for c in _saved(comfy_base, alone.outputs["save"]["images"])] == [(128, 128, 3)]
    assert "0 of 1 images had a face" in alone.outputs["report"]["text"][0]
    assert "No image had a face" in alone.outputs["report"]["text"][0]


def test_face_crop_error_mode_names_the_faceless_image(comfy):
    result = _face_then_faceless(comfy, "error")
    assert result.status == "error"
    assert result.error["node_type"] == "MetaLoRAFaceCrop"
    assert "image 1 of the batch has no detectable face" in result.error["exception_message"]
