"""ComfyUI model folders used by the pack, registered through ``folder_paths`` so ``extra_model_paths.yaml``
entries (``metalora: ...``, ``insightface: ...``) add to them.

- ``metalora``: LoMDs and identity adapters (``models/metalora``).
- ``insightface``: face models as ``models/insightface/models/<name>/`` (ComfyUI's usual layout).
- ``loras``: ComfyUI's own folder; exported standard LoRAs go to its first path.
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from ...metalora_core.errors import MetaLoRAError
from ...metalora_core.formats import FORMAT_IDENTITY
from ...metalora_core.safeio import read_metadata

METALORA = "metalora"
INSIGHTFACE = "insightface"


def _register(name: str, extensions: set[str]) -> None:
    folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=True)
    _paths, exts = folder_paths.folder_names_and_paths[name]
    exts.update(extensions)  # a yaml entry registered first leaves an empty set (= every file)


def register_model_folders() -> None:
    """Idempotent: adds ``models/metalora`` and ``models/insightface`` (first, as defaults)."""
    _register(METALORA, {".safetensors"})
    _register(INSIGHTFACE, set())


def _format_of(name: str) -> str:
    path = folder_paths.get_full_path(METALORA, name)
    try:
        return read_metadata(path).get("format", "") if path else ""
    except MetaLoRAError:
        return ""  # listed anyway: loading it then shows what is wrong with the file


def lomd_files() -> list[str]:
    """Files of the metalora folder that are not identity adapters (LoMDs in any supported layout)."""
    return [n for n in folder_paths.get_filename_list(METALORA) if _format_of(n) != FORMAT_IDENTITY]


def identity_files() -> list[str]:
    return [n for n in folder_paths.get_filename_list(METALORA) if _format_of(n) == FORMAT_IDENTITY]


def metalora_path(name: str) -> str:
    path = folder_paths.get_full_path(METALORA, name)
    if path is None:
        raise MetaLoRAError(
            f"'{name}' is not in any metalora model folder ({', '.join(folder_paths.get_folder_paths(METALORA))}); "
            "put the file into ComfyUI/models/metalora/ and refresh"
        )
    return path


def face_models() -> list[str]:
    """Names of folders ``<insightface root>/models/<name>/`` that hold .onnx files."""
    names: set[str] = set()
    for root in folder_paths.get_folder_paths(INSIGHTFACE):
        base = Path(root) / "models"
        if base.is_dir():
            names.update(p.name for p in base.iterdir() if p.is_dir() and any(p.rglob("*.onnx")))
    return sorted(names)


def face_model_root(name: str) -> str:
    """The insightface root holding ``models/<name>/`` (the first registered root when none does, so the
    faces library's validation names the exact folder the files must go to)."""
    roots = folder_paths.get_folder_paths(INSIGHTFACE)
    for root in roots:
        if (Path(root) / "models" / name).is_dir():
            return root
    return roots[0]


def loras_dir() -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0])


def metalora_dir() -> Path:
    return Path(folder_paths.get_folder_paths(METALORA)[0])
