"""Face Crop and R-FaceSim nodes over ``metalora_core.faces`` (insightface models in models/insightface/models)."""

from __future__ import annotations

import threading

import comfy.model_management
import numpy as np
import torch
from comfy_api.latest import io

from ..metalora_core.errors import MetaLoRAError
from ..metalora_core.faces import NO_FACE_MODES, FaceAnalyzer, crop_batch, load_analyzer, r_facesim
from .comfy_folders.model_folders import face_model_root, face_models
from .types import CATEGORY

_LOCK = threading.Lock()
_ANALYZERS: dict[tuple[str, str], FaceAnalyzer] = {}


def analyzer_for(name: str) -> FaceAnalyzer:
    """Load (once per root + name) the face model; the faces library validates the folder first."""
    if not name:
        raise MetaLoRAError(
            "no face model found: put a detector + recognizer (.onnx, e.g. antelopev2) into "
            "ComfyUI/models/insightface/models/<name>/ and refresh"
        )
    root = face_model_root(name)
    with _LOCK:
        if (root, name) not in _ANALYZERS:
            _ANALYZERS[(root, name)] = load_analyzer(root, name)
        return _ANALYZERS[(root, name)]


def _face_model_input() -> io.Combo.Input:
    models = face_models()
    return io.Combo.Input(
        "face_model",
        options=models,
        default="antelopev2" if "antelopev2" in models else None,
        tooltip="An insightface model folder in ComfyUI/models/insightface/models/ (antelopev2, buffalo_l, ...): "
        "a detector and a recognizer .onnx directly inside it.",
    )


def to_comfy_image(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).float().div(255.0)


class MetaLoRAFaceCrop(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MetaLoRAFaceCrop",
            display_name="Meta-LoRA Face Crop",
            category=f"{CATEGORY}/faces",
            description=(
                "Finds the largest face (or the n-th by size) in each image and returns a square crop around "
                "it plus a soft face mask (1 on the face, fading to 0). An image without a face becomes the "
                "whole image (centre square, all-zero mask), is left out, or stops the node naming it "
                "(if_no_face); the report says how many had a face and which had none. If every image is "
                "skipped, the whole images come back (a batch cannot be empty) and the report says so."
            ),
            inputs=[
                io.Image.Input("image", tooltip="Photo(s) to crop; every image of the batch is cropped."),
                _face_model_input(),
                io.Float.Input(
                    "margin",
                    default=0.5,
                    min=0.0,
                    max=4.0,
                    step=0.05,
                    tooltip="Context around the face, as a fraction of the face size on each side.",
                ),
                io.Int.Input(
                    "size",
                    default=512,
                    min=64,
                    max=4096,
                    step=16,
                    tooltip="Side of the square output in pixels (crops are resized to it so a batch stays one tensor).",
                ),
                io.Int.Input(
                    "face_index",
                    default=0,
                    min=0,
                    max=63,
                    tooltip="Which face when there are several: 0 = the largest, 1 = the second largest, ...",
                ),
                io.Combo.Input(
                    "if_no_face",
                    options=list(NO_FACE_MODES),
                    default="whole image",
                    optional=True,  # API prompts saved before this input existed still validate
                    tooltip="An image without a (face_index-th) face: 'whole image' = its centre square "
                    "with an all-zero mask (the batch keeps its length and order); 'skip' = left out of "
                    "the batch (all skipped: the whole images come back); 'error' = stop, naming the image. "
                    "The report lists the faceless images in every case.",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="crop", tooltip="The face crops."),
                io.Mask.Output(
                    display_name="mask", tooltip="Soft face masks in the crops' pixels (all zero: no face)."
                ),
                io.String.Output(
                    display_name="report",
                    tooltip="How many images had a face, which batch indices had none and what became of them.",
                ),
            ],
        )

    @classmethod
    def execute(cls, image, face_model, margin, size, face_index, if_no_face="whole image") -> io.NodeOutput:
        analyzer = analyzer_for(face_model)

        def find_face(rgb: np.ndarray):
            comfy.model_management.throw_exception_if_processing_interrupted()
            face = analyzer.analyze(rgb, face_index).face
            return None if face is None else face.bbox

        what = f"face (face_index {face_index})" if face_index else "face"
        batch = crop_batch(list(image), find_face, margin, size, if_no_face, what=what)
        crops = torch.stack([to_comfy_image(crop.image) for crop in batch.crops])
        masks = torch.stack([torch.from_numpy(crop.mask) for crop in batch.crops])
        return io.NodeOutput(crops, masks, batch.report)


class MetaLoRAFaceSimilarity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MetaLoRAFaceSimilarity",
            display_name="Meta-LoRA R-FaceSim",
            category=f"{CATEGORY}/faces",
            description=(
                "R-FaceSim: how much the generated faces look like the person, measured against the person's "
                "OTHER real photos (the personalization photo is excluded, so copying it does not inflate the "
                "score). Generated images without a face are counted and reported, never a crash. Shows a "
                "score badge on the node."
            ),
            is_output_node=True,
            inputs=[
                io.Image.Input("images", tooltip="Generated images to score (a batch)."),
                io.Image.Input(
                    "references",
                    tooltip="Real photos of the same person (a batch); the personalization photo is removed "
                    "from them if present.",
                ),
                _face_model_input(),
                io.Image.Input(
                    "personalization_photo",
                    optional=True,
                    tooltip="The photo the identity was trained on: excluded from the references and used "
                    "for the copy check (FaceSim to it).",
                ),
            ],
            outputs=[
                io.Float.Output(
                    display_name="score",
                    tooltip="Mean R-FaceSim (cosine) over images with a face; 0 if none.",
                ),
                io.String.Output(display_name="report", tooltip="A text report with per-image values."),
            ],
        )

    @classmethod
    def execute(cls, images, references, face_model, personalization_photo=None) -> io.NodeOutput:
        analyzer = analyzer_for(face_model)
        exclude = personalization_photo[0] if personalization_photo is not None else None
        result = r_facesim(analyzer, images, references, exclude, pixel_metrics=False)
        report = result.report()
        score = float(result.score) if result.score is not None else 0.0
        return io.NodeOutput(score, report, ui={"metalora_score": [result.badge()], "text": [report]})
