"""Tiny ONNX face models that insightface routes and runs exactly like antelopev2 / buffalo_l.

Why: no real face model may be downloaded on test machines, yet the REAL insightface code path (model routing
in ``model_zoo.ModelRouter``, SCRFD decoding and NMS, ``face_align.norm_crop``, ArcFace inference) must be
exercised. Built at run time with the ``onnx`` helper API; nothing here is ever committed.

- Recognizer: one output (512-d), input ``(N, 3, 112, 112)`` (square, >= 112, divisible by 16: insightface's
  ArcFace rule); random weights from a seed, so equal crops give equal embeddings and different crops differ.
- Detector: SCRFD layout with 9 outputs (scores / boxes / 5 keypoints at strides 8, 16, 32; two anchors) and a
  dynamic input. Random weights would detect nothing, so its score convolution is a deterministic *marker*
  detector: it fires on a magenta square frame (:func:`draw_face_marker`) whose side is exactly ``4 * stride``
  detector pixels (32, 64 or 128) and on nothing a real photo contains. Its boxes are that square and its
  keypoints the ArcFace template inside it. Tests thus choose where "faces" are, how many and how large,
  while detection itself still runs through insightface.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

STRIDES = (8, 16, 32)
MARKER_SIDES = tuple(4 * s for s in STRIDES)  # face sizes (detector pixels) the tiny detector finds
MARKER_RGB = (255, 0, 255)
RECOGNIZER_FILE = "w600k_tiny.onnx"
DETECTOR_FILE = "det_tiny.onnx"
EMBEDDING_DIM = 512
_THRESHOLD = 1.2  # band-minus-ring mean of (R+B)/2 - G that counts as a marker (magenta gives ~1.99)
_GAIN = 10.0
_RING_WEIGHT = 2.0  # magenta around the frame (a bigger marker seen by a smaller window) vetoes it
# ArcFace's 5-point template in the 112 px crop (insightface.utils.face_align.arcface_dst)
_ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def _marker_kernel(stride: int) -> np.ndarray:
    """(1, 3, 6s, 6s) weights: +mean over the frame band, -mean over the ring outside it, of (R+B)/2 - G."""
    s = stride
    size = 6 * s
    yy, xx = np.mgrid[0:size, 0:size] - 3 * s  # offsets from the anchor point
    cheb = np.maximum(np.maximum(-yy - 0.5, yy + 0.5), np.maximum(-xx - 0.5, xx + 0.5))
    band = (cheb > s) & (cheb < 2 * s)
    ring = cheb > 2 * s
    spatial = band / band.sum() - _RING_WEIGHT * ring / ring.sum()
    colour = np.array([0.5, -1.0, 0.5])  # blob channels are R, G, B (SCRFD swaps BGR->RGB)
    return (colour[:, None, None] * spatial[None]).astype(np.float32)[None]


def _detector_graph(seed: int):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], []
    names = {"score": [], "bbox": [], "kps": []}
    kps_offsets = (_ARCFACE_DST / 112.0 * 4.0 - 2.0).reshape(-1)  # template inside a 4s box, stride units
    for s in STRIDES:
        # score: anchor 0 is the marker detector, anchor 1 never fires
        w = np.zeros((2, 3, 6 * s, 6 * s), np.float32)
        w[0] = _GAIN * _marker_kernel(s)[0]
        w[1] = 1e-3 * rng.standard_normal(w[1].shape).astype(np.float32)
        b = np.array([-_GAIN * _THRESHOLD, -30.0], np.float32)
        inits += [numpy_helper.from_array(w, f"score_w_{s}"), numpy_helper.from_array(b, f"score_b_{s}")]
        nodes.append(
            helper.make_node(
                "Conv",
                ["input.1", f"score_w_{s}", f"score_b_{s}"],
                [f"score_conv_{s}"],
                kernel_shape=[6 * s, 6 * s],
                strides=[s, s],
                pads=[3 * s, 3 * s, 2 * s, 2 * s],
            )
        )
        nodes.append(helper.make_node("Sigmoid", [f"score_conv_{s}"], [f"score_sig_{s}"]))
        heads = [("score", f"score_sig_{s}", 1)]
        # boxes (distance 2 strides on each side) and keypoints: constant per anchor, tiny random weights
        for kind, width, bias in (("bbox", 4, np.full(4, 2.0)), ("kps", 10, kps_offsets)):
            wk = 1e-6 * rng.standard_normal((2 * width, 3, 1, 1)).astype(np.float32)
            bk = np.tile(bias, 2).astype(np.float32)
            inits += [
                numpy_helper.from_array(wk, f"{kind}_w_{s}"),
                numpy_helper.from_array(bk, f"{kind}_b_{s}"),
            ]
            nodes.append(
                helper.make_node(
                    "Conv",
                    ["input.1", f"{kind}_w_{s}", f"{kind}_b_{s}"],
                    [f"{kind}_conv_{s}"],
                    kernel_shape=[1, 1],
                    strides=[s, s],
                )
            )
            heads.append((kind, f"{kind}_conv_{s}", width))
        for kind, src, width in heads:
            shape_name = f"{kind}_shape_{s}"
            inits.append(numpy_helper.from_array(np.array([-1, width], np.int64), shape_name))
            nodes.append(helper.make_node("Transpose", [src], [f"{kind}_t_{s}"], perm=[0, 2, 3, 1]))
            nodes.append(helper.make_node("Reshape", [f"{kind}_t_{s}", shape_name], [f"{kind}_{s}"]))
            names[kind].append(f"{kind}_{s}")
    for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
        for name in names[kind]:
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n_" + name, width]))
    graph = helper.make_graph(
        nodes,
        "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        outputs,
        inits,
    )
    return graph


def _recognizer_graph(seed: int, size: int):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed + 1)
    patch = size // 14
    conv_w = (rng.standard_normal((8, 3, patch, patch)) / patch).astype(np.float32)
    fc_w = (rng.standard_normal((8 * 14 * 14, EMBEDDING_DIM)) / np.sqrt(8 * 14 * 14)).astype(np.float32)
    fc_b = np.zeros(EMBEDDING_DIM, np.float32)
    nodes = [
        helper.make_node(
            "Conv", ["input.1", "conv_w"], ["conv"], kernel_shape=[patch, patch], strides=[patch] * 2
        ),
        helper.make_node("Tanh", ["conv"], ["act"]),
        helper.make_node("Flatten", ["act"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["fc1"]),
    ]
    inits = [
        numpy_helper.from_array(conv_w, "conv_w"),
        numpy_helper.from_array(fc_w, "fc_w"),
        numpy_helper.from_array(fc_b, "fc_b"),
    ]
    return helper.make_graph(
        nodes,
        "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", EMBEDDING_DIM])],
        inits,
    )


def _save(graph, path: Path) -> Path:
    import onnx
    from onnx import helper

    from ..safeio import atomic_write_bytes

    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="metalora-dev"
    )
    model.ir_version = 8  # readable by every onnxruntime >= 1.10
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    return atomic_write_bytes(path, lambda tmp: Path(tmp).write_bytes(data))


def write_tiny_face_models(
    root: str | os.PathLike, name: str = "tiny", seed: int = 0, recognizer_size: int = 112
) -> Path:
    """Write ``<root>/insightface/models/<name>/{det_tiny,w600k_tiny}.onnx``; returns that folder."""
    if recognizer_size < 112 or recognizer_size % 16 or recognizer_size % 14:
        raise ValueError("recognizer_size must be >= 112 and divisible by 16 and 14 (112, 224, ...)")
    folder = Path(root) / "insightface" / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    _save(_detector_graph(seed), folder / DETECTOR_FILE)
    _save(_recognizer_graph(seed, recognizer_size), folder / RECOGNIZER_FILE)
    return folder


def draw_face_marker(image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Draw the magenta frame the tiny detector reads as a face: a square box, band 1/4 of its side.

    The detector finds it when the side is 32, 64 or 128 pixels *after* insightface resizes the image to the
    detection size (scale ``det_size / max(H, W)``); the inside (the real face) is left untouched.
    """
    out = np.array(image, copy=True)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    band = max(1, int(round((x1 - x0) / 4)))
    colour = np.array(MARKER_RGB[: out.shape[2]] if out.ndim == 3 else MARKER_RGB[0], dtype=out.dtype)
    frame = np.zeros(out.shape[:2], bool)
    frame[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    frame[max(y0 + band, 0) : max(y1 - band, 0), max(x0 + band, 0) : max(x1 - band, 0)] = False
    out[frame] = colour
    return out


def marker_box(
    image_hw: tuple[int, int], center: tuple[int, int], side: int, det_size: int = 640
) -> tuple[float, float, float, float]:
    """Image-pixel box of a marker the tiny detector finds at ``det_size``: ``side`` in MARKER_SIDES
    (detector pixels) centred on ``center`` = (x, y) detector pixels, a multiple of ``side / 4``."""
    if side not in MARKER_SIDES:
        raise ValueError(f"side must be one of {MARKER_SIDES} detector pixels")
    stride = side // 4
    if center[0] % stride or center[1] % stride:
        raise ValueError(f"center must lie on the stride-{stride} anchor grid")
    scale = det_size / max(image_hw)
    cx, cy = center
    return (
        (cx - side / 2) / scale,
        (cy - side / 2) / scale,
        (cx + side / 2) / scale,
        (cy + side / 2) / scale,
    )


def paint_markers(image: np.ndarray, markers, det_size: int = 640) -> np.ndarray:
    """Paint tiny-detector faces: ``markers`` are ((x, y) detector-pixel centre, side) pairs."""
    out = image
    for center, side in markers:
        out = draw_face_marker(out, marker_box(image.shape[:2], center, side, det_size))
    return out
