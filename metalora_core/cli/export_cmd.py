"""``metalora export``: fold an identity into a standard LoRA (kohya/ComfyUI or diffusers/peft names)."""

from __future__ import annotations

import json

from ..errors import MetaLoRAError
from ..formats import check_pair, export_lora, load_identity, load_lomd
from ..models import family_named
from ..targets import FluxDims
from . import preflight


def dims_for_export(lomd, adapter, model: str | None):
    """Sizes the diffusers slicing needs: from ``--model`` if given, else from the files' own shapes."""
    if model:
        from ..model_files import read_model_dims

        return read_model_dims(model)[0]
    hidden = lomd.hidden_size or adapter.hidden_size
    if not hidden:
        raise MetaLoRAError(
            "the LoMD records no hidden size; pass --model to read it from the model's checkpoint"
        )
    family = family_named(lomd.base_arch)
    if family.name != "flux":  # no fused layers: the width alone places every layer
        return family.dims_for_lora(hidden, 4 * hidden)
    mlp = (
        next(
            (adapter.ups[n].shape[0] for n in adapter.targets if n.endswith("linear1")),
            3 * hidden + 4 * hidden,
        )
        - 3 * hidden
    )
    return FluxDims(hidden, mlp, 0, 0, 16, 0, 0, True, 16)


def run(args) -> int:
    preflight.output_file(args.out)
    chosen = args.format is not None
    args.format = args.format or "kohya"
    lomd = load_lomd(args.lomd)
    adapter = load_identity(args.adapter)
    check_pair(lomd, adapter, force=args.force)
    dims = dims_for_export(lomd, adapter, args.model)
    path = export_lora(args.out, lomd, adapter, dims, args.format, args.strength)
    if not chosen:  # say which format a bare command wrote, instead of choosing silently
        preflight.say(
            "metalora export: wrote the kohya format (ComfyUI's Load LoRA, kohya tools); "
            "--format diffusers writes diffusers / peft names"
        )
    print(
        json.dumps(
            {
                "written": str(path),
                "format": args.format,
                "rank": adapter.shape.rank_down,
                "targets": len(adapter.targets),
            }
        )
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export an identity as a standard LoRA (folded exactly; its rank is the LoMD's Down rank, 4 by default)",
    )
    p.add_argument("--lomd", required=True, help="the LoMD file the identity was trained against")
    p.add_argument("--adapter", required=True, help="the identity adapter file")
    p.add_argument(
        "--format",
        choices=["kohya", "diffusers"],
        help="kohya (the default): lora_unet_* names for ComfyUI's Load LoRA and kohya tools; "
        "diffusers: transformer.*.lora_A/B for diffusers' load_lora_weights",
    )
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument(
        "--strength", type=float, default=1.0, help="bake this multiplier into the LoRA (default 1)"
    )
    p.add_argument(
        "--model",
        help="FLUX.1 / Qwen-Image checkpoint to read sizes from (only needed if the files do not record them)",
    )
    p.add_argument(
        "--force", action="store_true", help="export even if the adapter was trained against another LoMD"
    )
    p.set_defaults(func=run)
