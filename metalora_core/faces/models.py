"""Find, validate and load an insightface model folder (antelopev2, buffalo_l, or any detector + recognizer).

Why validate first: insightface's ``FaceAnalysis`` either downloads (missing folder) or dies on
``assert 'detection' in self.models`` (nested ``<name>/<name>/`` folder, the most reported error of every
face node pack). We check the folder ourselves, name the exact file or folder at fault and where the files
must go, and only then hand the folder's absolute path to ``FaceAnalysis`` (a directory path is loaded in
place: its download code is never reached). Files are routed with insightface's own rule
(``model_zoo.ModelRouter``): >= 5 outputs is a detector; one square input of >= 112 px divisible by 16
(not 192 landmark / 96 attribute / 128 swapper) is a recognizer.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MetaLoRAError

KNOWN_MODELS = {
    "antelopev2": "scrfd_10g_bnkps.onnx (detector) + glintr100.onnx (recognizer, ArcFace r100, Glint360K)",
    "buffalo_l": "det_10g.onnx (detector) + w600k_r50.onnx (recognizer, ArcFace r50, WebFace600K)",
}


INSTALL_HINT = (
    "pip install insightface onnxruntime (onnxruntime-gpu for CUDA) into the Python that runs this. "
    "insightface ships no Windows wheel and its build needs the MSVC C++ build tools; without them install a "
    "prebuilt insightface wheel for your Python version (the ComfyUI community keeps them). Everything "
    "except the face features (face crops, face-weighted training, R-FaceSim) works without it"
)


def require_face_packages() -> None:
    """The packages the face features need, or one error saying what is missing and how to get it.

    Why: insightface is the most common failed install of identity packs (no wheel on Windows); a bare
    ``ModuleNotFoundError`` deep in a node says neither what it is for nor how to fix it.
    """
    import importlib.util

    missing = [
        name for name in ("insightface", "onnx", "onnxruntime") if not _importable(name, importlib.util)
    ]
    if missing:
        raise MetaLoRAError(
            f"the face features need {', '.join(missing)}, not installed here: {INSTALL_HINT}"
        )


def _importable(name: str, util) -> bool:
    try:
        return util.find_spec(name) is not None
    except (ImportError, ValueError):  # a None entry in sys.modules (blocked) or a broken parent package
        return False


@dataclass(frozen=True)
class ModelLayout:
    """A validated model folder: which file detects and which recognizes."""

    name: str
    folder: Path
    detector: Path
    recognizer: Path
    ignored: tuple[Path, ...] = field(default_factory=tuple)  # landmark / attribute models we do not need


def candidate_folders(root: str | os.PathLike, name: str) -> list[Path]:
    """Where a model named ``name`` may live under ``root``, in ComfyUI's order of preference."""
    root = Path(root).expanduser()
    return [root / "insightface" / "models" / name, root / "models" / name, root / name]


def suggested_folder(root: str | os.PathLike, name: str) -> Path:
    """Where ``name`` should go under ``root``, read the way the user meant ``root``: ComfyUI's models folder,
    its ``insightface`` folder, or ``insightface/models`` itself (never ``insightface/insightface/models``)."""
    root = Path(root).expanduser()
    if root.name == "insightface":
        return root / "models" / name
    if root.name == "models" and root.parent.name in ("insightface", ".insightface"):
        return root / name
    if root.name == ".insightface":
        return root / "models" / name
    return root / "insightface" / "models" / name


# folders that hold model folders; never model folders themselves
_CONTAINERS = {"insightface", "models"}


def _expected(folder: Path, name: str) -> str:
    hint = KNOWN_MODELS.get(name, "a detector (SCRFD .onnx) and a recognizer (ArcFace .onnx)")
    return (
        f"put the .onnx files of '{name}' directly in {folder}/ "
        f"(ComfyUI: models/insightface/models/{name}/), i.e. {hint}. Nothing is downloaded automatically"
    )


def _available(root: Path) -> list[str]:
    found = []
    for base in (root / "insightface" / "models", root / "models", root):
        if base.is_dir():
            found += [
                p.name
                for p in sorted(base.iterdir())
                if p.is_dir() and p.name not in _CONTAINERS and any(p.rglob("*.onnx"))
            ]
    return sorted(set(found))


def resolve_folder(root: str | os.PathLike, name: str) -> Path:
    """The existing model folder for ``name`` (or ``name`` itself when it is a folder path)."""
    direct = Path(name).expanduser()
    if direct.is_absolute() or os.sep in name or "/" in name:
        if direct.is_dir():
            return direct.resolve()
        raise MetaLoRAError(f"face model folder {direct} does not exist")
    root = Path(root).expanduser()
    target = suggested_folder(root, name)
    if not root.is_dir():
        raise MetaLoRAError(f"insightface root {root} does not exist; {_expected(target, name)}")
    for folder in candidate_folders(root, name):
        if folder.is_dir():
            return folder.resolve()
    zips = [p for p in candidate_folders(root, name + ".zip") if p.is_file()]
    if zips:
        raise MetaLoRAError(f"{zips[0]} is still zipped: unzip it and {_expected(target, name)}")
    others = _available(root)
    listing = f" Model folders found there: {', '.join(others)}." if others else ""
    raise MetaLoRAError(
        f"face model '{name}' not found: no folder {target}/ under {root}.{listing} "
        f"To fix: {_expected(target, name)}"
    )


def _inspect_onnx(path: Path) -> tuple[int, list[list]]:
    """(number of outputs, input shapes) read from the graph, with a clear error for a broken file."""
    import onnx
    from google.protobuf.message import DecodeError

    if path.stat().st_size == 0:
        raise MetaLoRAError(f"{path} is empty (0 bytes): the download was interrupted; replace the file")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, TypeError, RuntimeError) as exc:
        raise MetaLoRAError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}); the file is corrupt or "
            "truncated: download it again and replace it"
        ) from None
    shapes = [
        [d.dim_value if d.dim_value > 0 else None for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    ]
    if not shapes or not model.graph.output:
        raise MetaLoRAError(f"{path} is an ONNX file without inputs or outputs: not a face model; replace it")
    return len(model.graph.output), shapes


def _route(n_outputs: int, shapes: list[list]) -> str | None:
    """insightface's ModelRouter rule (model_zoo.py), read from the graph instead of a live session."""
    if n_outputs >= 5:
        return "detection"
    shape = shapes[0]
    if len(shape) != 4:
        return None
    h, w = shape[2], shape[3]
    if (h, w) in ((192, 192), (96, 96)) or (len(shapes) == 2 and (h, w) == (128, 128)):
        return None  # landmark / attribute / swapper: not needed for identity
    if h is not None and h == w and h >= 112 and h % 16 == 0 and n_outputs == 1:
        return "recognition"
    return None


_VALIDATED: dict[tuple, ModelLayout] = {}


def validate_model(root: str | os.PathLike, name: str) -> ModelLayout:
    """Check the folder before anything is loaded; every problem names the folder/file and the fix."""
    require_face_packages()
    folder = resolve_folder(root, name)
    onnx_files = sorted(folder.glob("*.onnx"))
    label = Path(name).name
    if not onnx_files:
        nested = sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob("*.onnx")))
        if nested:
            inner = nested[0]
            raise MetaLoRAError(
                f"face model folder is nested: the .onnx files are in {inner}/ but must be directly in "
                f"{folder}/ (the '{label}/{inner.name}/' mistake, which makes insightface fail with "
                f"\"assert 'detection' in self.models\"). Move {', '.join(p.name for p in sorted(inner.glob('*.onnx')))} "
                f"up into {folder}/ and delete the empty {inner}/"
            )
        raise MetaLoRAError(f"face model folder {folder}/ holds no .onnx file; {_expected(folder, label)}")
    key = (str(folder), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in onnx_files))
    if key in _VALIDATED:
        return _VALIDATED[key]
    tasks: dict[str, Path] = {}
    ignored = []
    for path in onnx_files:  # sorted, first of each task wins: exactly insightface's choice
        task = _route(*_inspect_onnx(path))
        if task is None or task in tasks:
            ignored.append(path)
        else:
            tasks[task] = path
    listing = ", ".join(p.name for p in onnx_files)
    if "detection" not in tasks:
        raise MetaLoRAError(
            f"face model folder {folder}/ has no face detector (an SCRFD .onnx with >= 5 outputs, e.g. "
            f"scrfd_10g_bnkps.onnx or det_10g.onnx); it holds: {listing}. Add the detector file there"
        )
    if "recognition" not in tasks:
        raise MetaLoRAError(
            f"face model folder {folder}/ has no face recognizer (an ArcFace .onnx with one square input of "
            f">= 112 px, e.g. glintr100.onnx or w600k_r50.onnx); it holds: {listing}. Add the recognizer there"
        )
    layout = ModelLayout(label, folder, tasks["detection"], tasks["recognition"], tuple(ignored))
    _VALIDATED[key] = layout
    return layout


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, else CPU (CPU always last, as a fallback)."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + [
        "CPUExecutionProvider"
    ]


class FaceModel:
    """A loaded detector + recognizer: insightface's own SCRFD and ArcFaceONNX objects."""

    def __init__(self, layout: ModelLayout, providers: list[str] | None = None, det_thresh: float = 0.5):
        from insightface.app import FaceAnalysis

        self.layout = layout
        self.name = layout.name
        self.providers = list(providers or default_providers())
        try:
            # An existing folder path is loaded in place by FaceAnalysis: no download path exists for it.
            app = FaceAnalysis(
                name=str(layout.folder),
                root=str(layout.folder.parent),
                allowed_modules=["detection", "recognition"],
                providers=self.providers,
            )
            ctx = 0 if self.providers[0] == "CUDAExecutionProvider" else -1
            app.prepare(ctx_id=ctx, det_thresh=det_thresh, det_size=(640, 640))
        except MetaLoRAError:
            raise
        except Exception as exc:  # onnxruntime / insightface errors: name the folder and files
            raise MetaLoRAError(
                f"insightface could not load the face models in {layout.folder}/ (detector "
                f"{layout.detector.name}, recognizer {layout.recognizer.name}): {type(exc).__name__}: {exc}"
            ) from None
        if "detection" not in app.models or "recognition" not in app.models:
            raise MetaLoRAError(
                f"insightface did not route {layout.detector.name} / {layout.recognizer.name} in "
                f"{layout.folder}/ as detector / recognizer (found: {sorted(app.models)})"
            )
        self.app = app
        self.detector = app.models["detection"]
        self.recognizer = app.models["recognition"]
        self.det_thresh = det_thresh
        self.lock = threading.Lock()  # onnxruntime sessions are shared; keep one image in flight per model

    @property
    def embedding_size(self) -> int:
        shape = self.recognizer.output_shape
        return int(shape[-1]) if shape and isinstance(shape[-1], int) else 512

    def __repr__(self) -> str:
        return f"FaceModel({self.name!r}, folder={str(self.layout.folder)!r}, providers={self.providers})"


_LOADED: dict[tuple, FaceModel] = {}
_LOAD_LOCK = threading.Lock()


def load_face_model(
    root: str | os.PathLike,
    name: str = "antelopev2",
    providers: list[str] | None = None,
    det_thresh: float = 0.5,
) -> FaceModel:
    """Validate then load (cached per folder, files and providers): ``<root>/insightface/models/<name>/``.

    ``root`` is ComfyUI's ``models`` folder (or any folder laid out the same way); ``<root>/models/<name>/``
    (insightface's own ``~/.insightface`` layout) and an absolute folder path as ``name`` work too.
    """
    layout = validate_model(root, name)
    providers = list(providers or default_providers())
    key = (
        str(layout.folder),
        str(layout.detector),
        str(layout.recognizer),
        tuple(providers),
        float(det_thresh),
    )
    stamp = tuple(p.stat().st_mtime_ns for p in (layout.detector, layout.recognizer))
    with _LOAD_LOCK:
        cached = _LOADED.get(key)
        if cached is not None and getattr(cached, "_stamp", None) == stamp:
            return cached
        model = FaceModel(layout, providers, det_thresh)
        model._stamp = stamp
        _LOADED[key] = model
        return model
