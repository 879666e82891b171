"""Where a LoMD comes from inside ComfyUI: Seeded LoMD (no prior) and Distill LoMD from LoRAs.

Thin nodes over :mod:`metalora_core.lomd`: sizes come from the loaded MODEL's logical weight shapes
(GGUF included), LoRA files from ComfyUI's ``models/loras``, saving into the pack's LoMD folder.
"""

from __future__ import annotations

import os

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..metalora_core.adapter import AdapterShape
from ..metalora_core.errors import MetaLoRAError
from ..metalora_core.formats import save_lomd
from ..metalora_core.lomd.distill import DistillCancelled, DistillConfig, distill_lomd
from ..metalora_core.lomd.seeded import seeded_lomd_for_shapes
from ..metalora_core.models import FAMILIES, family_of
from ..metalora_core.targets import DEFAULT_PRESET, PRESET_HELP, FluxDims, QwenImageDims, resolve_targets
from .comfy_folders.lora_selection import ALL, select_loras, subfolders
from .comfy_folders.model_folders import metalora_dir
from .comfy_model.model_shapes import model_target_shapes
from .comfy_training.families import model_dims
from .files import target_path
from .types import CATEGORY, LoMDType, fixed_seed_input

TARGETS_TOOLTIP = "Layers the LoMD covers (Train and Apply use exactly these). " + " ".join(
    f"{family.label}: " + "; ".join(f"{k}: {v}" for k, v in family.presets.items()) + "."
    for family in FAMILIES.values()
)


def _rank_inputs() -> list[io.Input]:
    return [
        io.Int.Input(
            "rank_down", default=4, min=1, max=64, tooltip="Rank of the shared Down (the paper's LoMD: 4)."
        ),
        io.Int.Input(
            "rank_mid",
            default=16,
            min=1,
            max=256,
            tooltip="Mid rank identities trained on this LoMD default to (the paper: 16).",
        ),
        io.Combo.Input("targets", options=list(PRESET_HELP), default=DEFAULT_PRESET, tooltip=TARGETS_TOOLTIP),
    ]


def model_targets(model, preset: str) -> tuple[FluxDims | QwenImageDims, dict[str, tuple[int, int]]]:
    """Sizes of the MODEL (its family's) and ``{target: (out, in)}`` of the preset, from its LOGICAL weight
    shapes (GGUF included)."""
    dims = model_dims(model)
    shapes = model_target_shapes(model)
    out = {}
    for target in resolve_targets(dims, preset):
        if target.name not in shapes:
            raise MetaLoRAError(f"MODEL input: layer '{target.name}' has no 2-D weight in this model")
        if shapes[target.name] != (target.out_features, target.in_features):
            raise MetaLoRAError(
                f"MODEL input: layer '{target.name}' has shape {shapes[target.name]}, expected "
                f"{(target.out_features, target.in_features)} for a {family_of(dims).label} of width {dims.hidden}"
            )
        out[target.name] = shapes[target.name]
    return dims, out


class MetaLoRASeededLoMD(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MetaLoRASeededLoMD",
            display_name="Seeded LoMD (no prior)",
            category=f"{CATEGORY}/loaders",
            description=(
                "Builds a LoMD from the MODEL's shapes alone, no file needed: an orthonormal random Down per "
                "layer from the seed. It holds NO meta-learned prior: an identity trained on it behaves like "
                "a rank-4 LoRA whose down projection is frozen at random (it still trains and exports "
                "exactly). Use it when you have no meta-trained or distilled LoMD; identities record "
                "'lomd_source: seeded'."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The FLUX.1 or Qwen-Image model the LoMD is for (its layer sizes are read, not changed).",
                ),
                *_rank_inputs(),
                fixed_seed_input(
                    "Seed of the random Down. Keep it fixed: an identity only works with the exact LoMD it "
                    "was trained on (same model, ranks, targets and seed give the same LoMD)."
                ),
            ],
            outputs=[
                LoMDType.Output(
                    display_name="lomd",
                    tooltip="A seeded LoMD (no prior) for Meta-LoRA Train Identity and Meta-LoRA Apply.",
                )
            ],
        )

    @classmethod
    def execute(cls, model, rank_down, rank_mid, targets, seed) -> io.NodeOutput:
        dims, shapes = model_targets(model, targets)
        lomd = seeded_lomd_for_shapes(shapes, AdapterShape(rank_down, rank_mid), seed, dims.hidden)
        lomd.source = f"<seeded LoMD, seed {seed}>"
        return io.NodeOutput(lomd)


def _lora_names() -> list[str]:
    return list(folder_paths.get_filename_list("loras"))


class MetaLoRADistillLoMD(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MetaLoRADistillLoMD",
            display_name="Distill LoMD from LoRAs",
            category=f"{CATEGORY}/loaders",
            description=(
                "Distils a LoMD from FLUX.1 or Qwen-Image person/character LoRAs you already have in "
                "models/loras: per layer, the input subspace their changes share (every LoRA weighs the same). Reads kohya, ComfyUI "
                "and diffusers/peft files one at a time; LoRAs for another model or with NaN are skipped and "
                "named in the report. Layers no LoRA covers get a seeded Down. Cancel stops it."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The FLUX.1 or Qwen-Image model the LoMD is for (sizes are read, not changed).",
                ),
                io.Combo.Input(
                    "folder",
                    options=subfolders(_lora_names()),
                    default=ALL,
                    tooltip="Use the LoRAs in this sub-folder of models/loras (and below). Pick a folder that "
                    "holds only person LoRAs: style LoRAs would pull the Down away from faces.",
                ),
                io.String.Input(
                    "loras",
                    default="",
                    multiline=True,
                    tooltip="Optional: one LoRA per line, relative to models/loras (people/anna.safetensors), "
                    "'*' wildcards allowed (people/*); '#' starts a comment. Empty: every .safetensors in "
                    "'folder'. A line that matches nothing stops the node with its name.",
                ),
                *_rank_inputs(),
                io.Combo.Input(
                    "weighting",
                    options=["energy", "none"],
                    default="energy",
                    tooltip="energy: each LoRA counts the same in every layer it covers (a loud LoRA cannot "
                    "decide alone). none: stronger LoRAs weigh more.",
                ),
                fixed_seed_input("Seed of the Down of layers no selected LoRA covers (kept fixed)."),
                io.String.Input(
                    "save_as",
                    default="",
                    tooltip="Optional file name (no extension) to save the LoMD in models/metalora, so "
                    "Load LoMD lists it. Empty: not saved (the output still works in this graph).",
                ),
                io.Boolean.Input(
                    "overwrite", default=False, tooltip="Replace an existing file named 'save_as'."
                ),
            ],
            outputs=[
                LoMDType.Output(
                    display_name="lomd", tooltip="The distilled LoMD, for Train Identity / Apply."
                ),
                io.String.Output(
                    display_name="report",
                    tooltip="LoRAs used and skipped (with the reason), layers seeded, energy kept.",
                ),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, loras, **_):
        try:
            names = select_loras(_lora_names(), folder, loras)
        except MetaLoRAError:
            return float("nan")  # re-run to show the error
        stamps = []
        for name in names:
            path = folder_paths.get_full_path("loras", name)
            st = os.stat(path) if path else None
            stamps.append(f"{name}:{st.st_mtime_ns if st else 0}:{st.st_size if st else 0}")
        return "|".join(stamps)

    @classmethod
    def execute(
        cls, model, folder, loras, rank_down, rank_mid, targets, weighting, seed, save_as, overwrite
    ) -> io.NodeOutput:
        dims, _ = model_targets(model, targets)
        names = select_loras(_lora_names(), folder, loras)
        out_path = target_path(metalora_dir(), save_as, overwrite) if save_as.strip() else None
        paths = [folder_paths.get_full_path_or_raise("loras", n) for n in names]
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        bar = comfy.utils.ProgressBar(2 * len(paths), node_id=node_id)
        config = DistillConfig(rank_down, rank_mid, targets, None, weighting, seed)
        try:
            report = distill_lomd(
                paths,
                dims,
                config,
                lambda done, total, _msg: bar.update_absolute(done, total),
                comfy.model_management.processing_interrupted,
            )
        except DistillCancelled:
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise comfy.model_management.InterruptProcessingException() from None
        lomd = report.lomd
        text = report_text(report, names, paths)
        if out_path is not None:
            save_lomd(out_path, lomd)
            lomd.source = str(out_path)
            text += f"\nsaved {out_path}"
        return io.NodeOutput(lomd, text, ui=ui.PreviewText(text))


def report_text(report, names: list[str], paths: list[str]) -> str:
    """A few lines a user reads in the graph: what was used, skipped, seeded, and how much energy is kept."""
    by_path = dict(zip(paths, names))
    s = report.summary()
    lines = [f"distilled LoMD from {s['loras_used']} of {len(names)} LoRAs ({s['layers_distilled']} layers)"]
    if s["energy_kept_mean"] is not None:
        w = s["energy_kept_worst"]
        lines.append(
            f"energy kept: mean {s['energy_kept_mean']:.1%}, worst {w['share']:.1%} "
            f"({w['lora']}, {w['layer']})"
        )
    for path, reason in report.skipped:
        lines.append(f"skipped {by_path.get(path, path)}: {reason}")
    if report.uncovered:
        lines.append(f"{len(report.uncovered)} layers no LoRA covers got a seeded Down: {', '.join(report.uncovered[:6])}"
                     + (" ..." if len(report.uncovered) > 6 else ""))  # fmt: skip
    return "\n".join(lines)
