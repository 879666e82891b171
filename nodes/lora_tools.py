"""LoRA file tools as nodes: difference, merge, resize, rescale (LoRA files in models/loras) and extraction
(two checkpoints in models/diffusion_models). Each writes a new LoRA into models/loras, streaming layer by
layer in :mod:`metalora_core.loras.tools`, with a progress bar and the Cancel button checked per layer."""

from __future__ import annotations

import json

import comfy.utils
import folder_paths
from comfy import model_management
from comfy_api.latest import io, ui

from ..metalora_core.errors import MetaLoRAError
from ..metalora_core.loras import tools
from ..metalora_core.targets import PRESETS, presets_help
from .comfy_folders.model_folders import loras_dir
from .export import DTYPES, lora_file_inputs
from .files import target_path
from .types import CATEGORY

_GROUP = f"{CATEGORY}/lora tools"
NONE = "(none)"


def _lora_input(name: str, tooltip: str, optional: bool = False) -> io.Combo.Input:
    files = folder_paths.get_filename_list("loras")
    return io.Combo.Input(
        name, options=[NONE, *files] if optional else files, optional=optional, tooltip=tooltip
    )


def _lora_path(name: str) -> str:
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise MetaLoRAError(f"LoRA '{name}' is not in models/loras")
    return path


def _rank_inputs(required: bool) -> list:
    zero = "" if required else " 0 = exact (ranks add up, nothing is lost)."
    return [
        io.Int.Input(
            "rank",
            default=16 if required else 0,
            min=0,
            max=3072,
            tooltip=f"Compress each layer to this rank by SVD (the best approximation of that rank).{zero}",
        ),
        io.Float.Input(
            "energy",
            default=0.0,
            min=0.0,
            max=1.0,
            step=0.001,
            tooltip="Instead of a fixed rank: keep the smallest rank reaching this fraction of each "
            "layer's spectral energy (e.g. 0.99). 0 = use 'rank'.",
        ),
    ]


def _output_inputs(default_name: str) -> list:
    return [
        io.String.Input(
            "filename",
            default=default_name,
            tooltip="Output file name without extension, written to models/loras/<filename>.safetensors.",
        ),
        io.Combo.Input(
            "format",
            options=["kohya", "diffusers"],
            default="kohya",
            tooltip="Key naming of the output: kohya (lora_unet_*, ComfyUI / kohya tools) or diffusers "
            "(transformer.*.lora_A/B). Any input naming is read, so this also converts.",
        ),
        *lora_file_inputs("fp32 keeps the factors exact; bf16 / fp16 halve the file."),
    ]


def _schema(node_id: str, name: str, description: str, inputs: list, default_name: str) -> io.Schema:
    return io.Schema(
        node_id=node_id,
        display_name=name,
        category=_GROUP,
        description=description,
        is_output_node=True,
        inputs=[*inputs, *_output_inputs(default_name)],
        outputs=[
            io.String.Output(
                display_name="lora_name", tooltip="The written LoRA's name in models/loras (for Load LoRA)."
            )
        ],
    )


def _truncation(rank: int, energy: float) -> dict:
    if energy > 0:
        return {"rank": None, "energy": float(energy)}
    return {"rank": int(rank) or None, "energy": None}


def _run(filename: str, overwrite: bool, fmt: str, dtype: str, call) -> io.NodeOutput:
    """Resolve the output path, run ``call(out, progress, fmt=, dtype=)`` and report what was written."""
    folder = loras_dir()
    path = target_path(folder, filename, overwrite)
    bar = comfy.utils.ProgressBar(1)

    def progress(done: int, total: int, _layer: str) -> None:
        model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    report = call(path, progress, fmt=fmt, dtype=DTYPES[dtype])
    name = path.relative_to(folder.resolve()).as_posix()
    summary = report.summary()
    text = f"wrote '{name}': {summary['layers']} layers, max rank {summary['rank_max']}"
    if summary["relative_error_max"] > 0:
        text += f", energy kept >= {summary['energy_kept_min']:.4f}, max relative error {summary['relative_error_max']:.2e}"
    return io.NodeOutput(name, ui=ui.PreviewText(text + "\n" + json.dumps(report.as_dict()["per_layer"])))


class MetaLoRALoraDifference(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            "MetaLoRALoraDifference",
            "LoRA Difference (B - A)",
            "Writes a LoRA equal to B minus A: loading it once at strength 1 gives the model that B at +1 "
            "and A at -1 give. Exact by default (the factors are stacked), or compressed to a rank.",
            [
                _lora_input("lora_a", "A: the LoRA subtracted."),
                _lora_input("lora_b", "B: the LoRA kept."),
                *_rank_inputs(required=False),
            ],
            "lora_difference",
        )

    @classmethod
    def execute(cls, lora_a, lora_b, rank, energy, filename, format, dtype, overwrite) -> io.NodeOutput:
        a, b, cut = _lora_path(lora_a), _lora_path(lora_b), _truncation(rank, energy)
        return _run(
            filename,
            overwrite,
            format,
            dtype,
            lambda out, p, **kw: tools.difference(a, b, out, progress=p, **cut, **kw),
        )


class MetaLoRALoraMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        weights = [
            io.Float.Input(
                f"weight_{i}",
                default=1.0,
                min=-10.0,
                max=10.0,
                step=0.01,
                optional=i > 2,
                tooltip=f"Weight of LoRA {i} (its strength in the sum).",
            )
            for i in range(1, 5)
        ]
        loras = [
            _lora_input("lora_1", "First LoRA."),
            _lora_input("lora_2", "Second LoRA."),
            _lora_input("lora_3", "Optional third LoRA.", optional=True),
            _lora_input("lora_4", "Optional fourth LoRA.", optional=True),
        ]
        return _schema(
            "MetaLoRALoraMerge",
            "LoRA Merge (weighted)",
            "Writes one LoRA equal to the weighted sum of up to four LoRAs (the model they give when "
            "loaded together at these strengths). Exact by default, or compressed to a rank.",
            [x for pair in zip(loras, weights) for x in pair] + _rank_inputs(required=False),
            "lora_merge",
        )

    @classmethod
    def execute(
        cls,
        lora_1,
        weight_1,
        lora_2,
        weight_2,
        rank,
        energy,
        filename,
        format,
        dtype,
        overwrite,
        lora_3=NONE,
        weight_3=1.0,
        lora_4=NONE,
        weight_4=1.0,
    ) -> io.NodeOutput:
        pairs = [(lora_1, weight_1), (lora_2, weight_2), (lora_3, weight_3), (lora_4, weight_4)]
        chosen = [(_lora_path(n), float(w)) for n, w in pairs if n and n != NONE]
        cut = _truncation(rank, energy)
        return _run(
            filename,
            overwrite,
            format,
            dtype,
            lambda out, p, **kw: tools.merge(
                [c[0] for c in chosen], [c[1] for c in chosen], out, progress=p, **cut, **kw
            ),
        )


class MetaLoRALoraResize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            "MetaLoRALoraResize",
            "LoRA Resize (SVD)",
            "Writes a smaller LoRA: each layer truncated by SVD to a rank or to a kept fraction of its "
            "spectral energy. The report lists per layer the rank, energy kept and the exact error (the "
            "discarded singular values).",
            [_lora_input("lora", "The LoRA to resize."), *_rank_inputs(required=True)],
            "lora_resized",
        )

    @classmethod
    def execute(cls, lora, rank, energy, filename, format, dtype, overwrite) -> io.NodeOutput:
        path, cut = _lora_path(lora), _truncation(rank, energy)
        return _run(
            filename,
            overwrite,
            format,
            dtype,
            lambda out, p, **kw: tools.resize(path, out, progress=p, **cut, **kw),
        )


class MetaLoRALoraRescale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            "MetaLoRALoraRescale",
            "LoRA Rescale / Convert",
            "Writes the LoRA with every change multiplied by a factor (ranks kept), in kohya or diffusers "
            "naming: factor 1 converts the naming only.",
            [
                _lora_input("lora", "The LoRA to rescale or convert."),
                io.Float.Input(
                    "factor",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Multiplier baked into the LoRA (negative inverts it; 1 = convert only).",
                ),
            ],
            "lora_rescaled",
        )

    @classmethod
    def execute(cls, lora, factor, filename, format, dtype, overwrite) -> io.NodeOutput:
        path = _lora_path(lora)
        return _run(
            filename,
            overwrite,
            format,
            dtype,
            lambda out, p, **kw: tools.rescale(path, out, float(factor), progress=p, **kw),
        )


class MetaLoRALoraExtract(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        models = folder_paths.get_filename_list("diffusion_models")
        return _schema(
            "MetaLoRALoraExtract",
            "LoRA Extract (fine-tuned - base)",
            "Writes a LoRA of the difference between a fine-tuned FLUX checkpoint and its base by truncated "
            "SVD per layer. Both files are read one layer at a time (never loaded whole), so memory stays at "
            "about one layer whatever the model size.",
            [
                io.Combo.Input(
                    "base_model",
                    options=models,
                    tooltip="The base FLUX checkpoint (models/diffusion_models).",
                ),
                io.Combo.Input(
                    "tuned_model", options=models, tooltip="The fine-tuned checkpoint, same architecture."
                ),
                *_rank_inputs(required=True),
                io.Combo.Input(
                    "layers",
                    options=list(PRESETS),
                    default="all_linear",
                    tooltip="Which layers to extract (FLUX.1 or Qwen-Image, read from the checkpoints): "
                    + presets_help(),
                ),
            ],
            "lora_extracted",
        )

    @classmethod
    def execute(
        cls, base_model, tuned_model, rank, energy, layers, filename, format, dtype, overwrite
    ) -> io.NodeOutput:
        base = folder_paths.get_full_path("diffusion_models", base_model)
        tuned = folder_paths.get_full_path("diffusion_models", tuned_model)
        if base is None or tuned is None:
            raise MetaLoRAError(
                f"'{base_model if base is None else tuned_model}' is not in models/diffusion_models"
            )
        e = float(energy) or None
        return _run(
            filename,
            overwrite,
            format,
            dtype,
            lambda out, p, **kw: tools.extract(base, tuned, out, int(rank), e, layers, progress=p, **kw),
        )


NODES = [
    MetaLoRALoraDifference,
    MetaLoRALoraMerge,
    MetaLoRALoraResize,
    MetaLoRALoraRescale,
    MetaLoRALoraExtract,
]
