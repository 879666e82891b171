"""Detect faces, pick one, align it and embed it, through insightface's own SCRFD / face_align / ArcFace code.

Why retries: SCRFD's largest anchors cover faces of a few hundred detector pixels, so a face filling a
portrait is missed at 640 and found once the image is shown smaller; like the InstantID / IPAdapter nodes we
retry at 640, 576, ..., 320 and stop at the first size that finds a face. The largest face (by box area) is
taken by default, not insightface's centre-weighted pick, because a portrait's subject is its largest face.
Embeddings are L2-normalised (cosine = dot product) and cached per image content and face index.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np

from .images import as_image_list, content_hash, to_rgb_uint8
from .models import FaceModel

DEFAULT_DET_SIZES = (640, 576, 512, 448, 384, 320)
MIN_SIDE = 32  # below this no detector anchor fits a face; say so instead of guessing


@dataclass
class Face:
    """One detected face in image pixels: box (x0, y0, x1, y1), 5 keypoints (eyes, nose, mouth corners)."""

    bbox: np.ndarray  # float64 (4,)
    kps: np.ndarray  # float64 (5, 2)
    det_score: float
    embedding: np.ndarray | None = None  # float32 (D,), unit length
    aligned: np.ndarray | None = None  # uint8 RGB (S, S, 3), insightface's 5-point alignment

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.bbox
        return float(max(0.0, x1 - x0) * max(0.0, y1 - y0))

    @property
    def box(self) -> tuple[int, int, int, int]:
        """The box rounded outwards to whole pixels (x0, y0, x1, y1)."""
        x0, y0, x1, y1 = self.bbox
        return int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1))


@dataclass
class ImageFaces:
    """What one image gave: the chosen face (or None and why), all faces largest first, the size used."""

    face: Face | None
    faces: list[Face] = field(default_factory=list)
    det_size: int | None = None
    image_hw: tuple[int, int] = (0, 0)
    note: str = ""

    @property
    def n_faces(self) -> int:
        return len(self.faces)


class FaceAnalyzer:
    """Face detection + embedding for single images and batches, with a content-keyed cache."""

    def __init__(
        self,
        model: FaceModel,
        det_sizes: tuple[int, ...] = DEFAULT_DET_SIZES,
        det_thresh: float | None = None,
        cache_size: int = 512,
    ):
        if not det_sizes or any(int(s) <= 0 or int(s) % 32 for s in det_sizes):
            raise ValueError(
                "det_sizes must be positive multiples of 32 (SCRFD's coarsest stride), e.g. (640, 320)"
            )
        self.model = model
        static = getattr(model.detector, "static_input_size", None)
        # a detector exported at one fixed size (e.g. 640 x 640) can only run at that size: no retries
        self.det_sizes = tuple(int(s) for s in det_sizes)
        self._inputs = [tuple(int(v) for v in static)] if static else [(s, s) for s in self.det_sizes]
        self.det_thresh = model.det_thresh if det_thresh is None else float(det_thresh)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, ImageFaces] = OrderedDict()
        self._lock = threading.Lock()

    # -- detection -------------------------------------------------------------------------------------
    def detect(self, image) -> tuple[list[Face], int | None]:
        """All faces (largest first, no embeddings) at the first detection size that finds any."""
        rgb = to_rgb_uint8(image)
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        for size in self._inputs:
            with self.model.lock:
                boxes, kpss = self.model.detector.detect(bgr, input_size=size, det_thresh=self.det_thresh)
            if boxes.shape[0] == 0:
                continue
            faces = [
                Face(
                    np.asarray(boxes[i, :4], np.float64),
                    np.asarray(kpss[i], np.float64) if kpss is not None else _kps_from_box(boxes[i, :4]),
                    float(boxes[i, 4]),
                )
                for i in range(boxes.shape[0])
            ]
            faces.sort(key=lambda f: (-f.area, -f.det_score))
            return faces, size[0]
        return [], None

    def embed(self, image, face: Face) -> Face:
        """A copy of ``face`` with ``embedding`` (unit length) and ``aligned`` from insightface's ArcFace and
        norm_crop (a copy: faces held in the cache are never changed)."""
        from insightface.app.common import Face as InsightFace
        from insightface.utils import face_align

        rgb = to_rgb_uint8(image)
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        rec = self.model.recognizer
        iface = InsightFace(
            bbox=face.bbox.astype(np.float32), kps=face.kps.astype(np.float32), det_score=face.det_score
        )
        with self.model.lock, warnings.catch_warnings():
            # insightface's face_align calls scikit-image's deprecated SimilarityTransform.estimate: noise
            warnings.filterwarnings("ignore", category=FutureWarning, module="insightface")
            raw = np.asarray(rec.get(bgr, iface), np.float64).reshape(-1)
            aligned = face_align.norm_crop(
                rgb, landmark=face.kps.astype(np.float32), image_size=rec.input_size[0]
            )
        norm = np.linalg.norm(raw)
        return replace(face, embedding=(raw / norm if norm > 0 else raw).astype(np.float32), aligned=aligned)

    # -- the public one-stop call ----------------------------------------------------------------------
    def analyze(self, image, index: int = 0) -> ImageFaces:
        """Detect, choose face ``index`` (0 = largest) and embed it; cached per image content and index."""
        rgb = to_rgb_uint8(image)
        key = (content_hash(rgb), int(index), self.det_sizes, self.det_thresh)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        result = self._analyze(rgb, int(index))
        with self._lock:
            self._cache[key] = result
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return result

    def _analyze(self, rgb: np.ndarray, index: int) -> ImageFaces:
        hw = (int(rgb.shape[0]), int(rgb.shape[1]))
        if min(hw) < MIN_SIDE:
            return ImageFaces(
                None, [], None, hw, f"image is {hw[1]}x{hw[0]} px, too small to hold a face (< {MIN_SIDE} px)"
            )
        faces, size = self.detect(rgb)
        if not faces:
            sizes = ", ".join(str(w) for w, _ in self._inputs)
            return ImageFaces(None, [], None, hw, f"no face found (detector sizes tried: {sizes})")
        if index < 0 or index >= len(faces):
            return ImageFaces(None, faces, size, hw, f"face #{index} asked for, but only {len(faces)} found")
        face = faces[index] = self.embed(rgb, faces[index])
        note = f"{len(faces)} faces found, using #{index} (largest first)" if len(faces) > 1 else ""
        return ImageFaces(face, faces, size, hw, note)

    def face(self, image, index: int = 0) -> Face | None:
        return self.analyze(image, index).face

    def analyze_batch(self, images, index: int = 0) -> list[ImageFaces]:
        """Each image of a batch (B, H, W, C) tensor/array or a list, analysed on its own."""
        return [self.analyze(im, index) for im in as_image_list(images)]

    def embeddings(self, images, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) float32 unit embeddings (rows of NaN where no face) and a (N,) bool mask of found faces."""
        results = self.analyze_batch(images, index)
        dim = next(
            (r.face.embedding.shape[0] for r in results if r.face is not None), self.model.embedding_size
        )
        out = np.full((len(results), dim), np.nan, np.float32)
        found = np.zeros(len(results), bool)
        for i, r in enumerate(results):
            if r.face is not None:
                out[i] = r.face.embedding
                found[i] = True
        return out, found

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()


def _kps_from_box(bbox) -> np.ndarray:
    """ArcFace's template points placed in a box: for detectors without keypoint outputs."""
    from insightface.utils.face_align import arcface_dst

    x0, y0, x1, y1 = (float(v) for v in bbox)
    return np.stack(
        [x0 + arcface_dst[:, 0] / 112.0 * (x1 - x0), y0 + arcface_dst[:, 1] / 112.0 * (y1 - y0)], 1
    )


def select_face(faces: list[Face], index: int = 0) -> Face | None:
    """Face ``index`` in order of decreasing box area (0 = largest); None when there are not that many."""
    ordered = sorted(faces, key=lambda f: (-f.area, -f.det_score))
    return ordered[index] if 0 <= index < len(ordered) else None
