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


def test_face_crop_returns_crop_and_mask_and_names_a_faceless_image(comfy, comfy_base):
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

    faceless = comfy.run(
        {
            "img": _load("noface.png"),
            "crop": node(
                "MetaLoRAFaceCrop", image=["img", 0], face_model="tiny", margin=0.5, size=256, face_index=0
            ),
            "save": node("SaveImage", images=["crop", 0], filename_prefix="facecrop"),
        }
    )
    assert faceless.status == "error"
    assert faceless.error["node_type"] == "MetaLoRAFaceCrop"
    assert "no detectable face" in faceless.error["exception_message"]
