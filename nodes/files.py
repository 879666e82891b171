"""Load LoMD, Load / Save identity: the pack's own files in ``models/metalora`` (or ``output``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from ..metalora_core.errors import MetaLoRAError
from ..metalora_core.formats import load_identity, load_lomd, save_identity
from .comfy_folders.model_folders import identity_files, lomd_files, metalora_dir, metalora_path
from .types import CATEGORY, IdentityType, LoMDType

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-/]*$")


def _file_stamp(name: str) -> str:
    path = folder_paths.get_full_path("metalora", name)
    if path is None:
        return name
    st = os.stat(path)
    return f"{path}:{st.st_mtime_ns}:{st.st_size}"  # a replaced file is reloaded


def target_path(folder: Path, filename: str, overwrite: bool) -> Path:
    """``folder/filename.safetensors``, refusing names that leave the folder and (unless asked) overwriting."""
    name = filename.strip().removesuffix(".safetensors")
    if not name or not _SAFE_NAME.match(name) or ".." in Path(name).parts:
        raise MetaLoRAError(
            f"filename '{filename}' is not allowed: use letters, digits, space, '_', '-', '.' and '/' "
            "for sub-folders, without '..'"
        )
    path = (folder / f"{name}.safetensors").resolve()
    if folder.resolve() not in path.parents:
        raise MetaLoRAError(f"filename '{filename}' points outside {folder}")
    if path.exists() and not overwrite:
        raise MetaLoRAError(f"{path} already exists; choose another filename or enable 'overwrite'")
    return path


class MetaLoRALoadLoMD(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MetaLoRALoadLoMD",
            display_name="Load Meta-LoRA LoMD",
            category=f"{CATEGORY}/loaders",
            description=(
                "Loads a LoMD (the shared, meta-learned Meta-Down of Meta-LoRA) from models/metalora. "
                "The file is validated: a standard LoRA, an identity adapter or a damaged file is refused "
                "with a message saying what it is. Shows where the LoMD comes from (meta-trained, "
                "distilled from LoRAs, or seeded = no prior)."
            ),
            inputs=[
                io.Combo.Input(
                    "lomd_name",
                    options=lomd_files(),
                    tooltip="A LoMD .safetensors in ComfyUI/models/metalora (or a 'metalora:' path of "
                    "extra_model_paths.yaml).",
                )
            ],
            outputs=[LoMDType.Output(display_name="lomd", tooltip="The shared Meta-Down.")],
        )

    @classmethod
    def fingerprint_inputs(cls, lomd_name):
        return _file_stamp(lomd_name)

    @classmethod
    def execute(cls, lomd_name) -> io.NodeOutput:
        lomd = load_lomd(metalora_path(lomd_name))
        return io.NodeOutput(lomd, ui=ui.PreviewText(origin_text(lomd)))


def origin_text(lomd) -> str:
    """What the node shows: where the LoMD comes from (a seeded one has no prior) and its size."""
    notes = {
        "seeded": "seeded: NO meta-learned prior (orthonormal random Down)",
        "distilled": "distilled from person LoRAs",
        "meta-trained": "meta-trained",
        "random": "random test LoMD: no prior",
    }
    where = notes.get(lomd.origin, "source not recorded")
    return f"{where}; rank {lomd.shape.rank_down}, {len(lomd.targets)} layers, fingerprint {lomd.fingerprint}"


class MetaLoRALoadIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MetaLoRALoadIdentity",
            display_name="Load Meta-LoRA Identity",
            category=f"{CATEGORY}/loaders",
            description=(
                "Loads a personalized identity adapter (Meta-LoRA Mid + Up layers) saved by "
                "'Save Meta-LoRA Identity' or 'metalora personalize'. Use it with the LoMD it was trained with."
            ),
            inputs=[
                io.Combo.Input(
                    "identity_name",
                    options=identity_files(),
                    tooltip="An identity adapter .safetensors in ComfyUI/models/metalora.",
                )
            ],
            outputs=[IdentityType.Output(display_name="identity", tooltip="The identity adapter.")],
        )

    @classmethod
    def fingerprint_inputs(cls, identity_name):
        return _file_stamp(identity_name)

    @classmethod
    def execute(cls, identity_name) -> io.NodeOutput:
        return io.NodeOutput(load_identity(metalora_path(identity_name)))


class MetaLoRASaveIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MetaLoRASaveIdentity",
            display_name="Save Meta-LoRA Identity",
            category=f"{CATEGORY}/io",
            description=(
                "Saves an identity adapter as .safetensors with its metadata (ranks, LoMD fingerprint, "
                "training settings). The write is atomic: an interrupted save never leaves a broken file."
            ),
            is_output_node=True,
            inputs=[
                IdentityType.Input("identity", tooltip="The identity adapter to save (from Train or Load)."),
                io.String.Input(
                    "filename",
                    default="identity",
                    tooltip="File name without extension; '/' makes sub-folders. Saved as <filename>.safetensors.",
                ),
                io.Combo.Input(
                    "destination",
                    options=["models/metalora", "output"],
                    default="models/metalora",
                    tooltip="models/metalora: appears in 'Load Meta-LoRA Identity'. output: ComfyUI's output folder.",
                ),
                io.Boolean.Input(
                    "overwrite",
                    default=False,
                    tooltip="Replace an existing file of the same name (otherwise the node stops with an error).",
                ),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Full path of the saved file.")],
        )

    @classmethod
    def execute(cls, identity, filename, destination, overwrite) -> io.NodeOutput:
        if destination == "output":
            folder = Path(folder_paths.get_output_directory())
        else:
            folder = metalora_dir()
        path = target_path(folder, filename, overwrite)
        save_identity(path, identity)
        return io.NodeOutput(str(path), ui=ui.PreviewText(f"saved {path}"))
