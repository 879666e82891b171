"""``metalora lomd seeded`` and ``metalora lomd distill``: a LoMD without meta-training (docs/lomd-sources.md).

``seeded`` needs only the model's sizes (``--model FLUX`` for FLUX.1 [dev]/[schnell], or a checkpoint);
``distill`` reads a folder or list of person LoRAs one file at a time and skips bad files by name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..adapter import AdapterShape
from ..errors import MetaLoRAError
from ..formats import save_lomd
from ..lomd.distill import DistillConfig, distill_lomd
from ..lomd.seeded import KNOWN_MODELS, known_dims, seeded_lomd
from ..model_files import read_model_dims
from ..targets import DEFAULT_PRESET, FluxDims, presets_help

MODEL_HELP = (
    f"the model the LoMD is for: {', '.join(sorted(KNOWN_MODELS))} (FLUX.1 or Qwen-Image sizes, no file "
    "needed), or a FLUX.1 / Qwen-Image checkpoint (.safetensors or diffusers folder; only its header is read). "
    "Default: FLUX"
)


def model_dims(model: str) -> FluxDims:
    """Sizes from a checkpoint path or a known model name. A path that exists wins: ``--model flux`` beside
    a folder ``flux/`` reads that folder (a stand-in FLUX of another width must not get FLUX.1's sizes),
    and says so."""
    if Path(model).exists():
        if known_dims(model):
            from . import preflight

            preflight.say(
                f"metalora lomd: --model {model}: reading the checkpoint '{model}' found here, not the FLUX.1 "
                "preset of that name (for the preset, run from another folder or give --model FLUX.1-dev)"
            )
        return read_model_dims(model)[0]
    return known_dims(model) or read_model_dims(model)[0]


def lora_paths(items: list[str]) -> list[Path]:
    """Files as given, and every ``*.safetensors`` under each folder (sorted, sub-folders included)."""
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            out += sorted(p for p in path.rglob("*.safetensors") if p.is_file())
        elif path.is_file():
            out.append(path)
        else:
            raise MetaLoRAError(f"--loras: '{item}' is neither a file nor a folder")
    if not out:
        raise MetaLoRAError(f"--loras: no .safetensors file in {', '.join(items)}")
    return out


def _seeded(args) -> int:
    lomd = seeded_lomd(
        model_dims(args.model), AdapterShape(args.rank, args.rank_mid), args.targets, args.seed
    )
    path = save_lomd(args.out, lomd)
    print(
        json.dumps(
            {
                "written": str(path),
                "lomd_source": "seeded",
                "note": "no meta-learned prior: identities behave like a rank-"
                f"{args.rank} LoRA with a frozen random down projection",
                "fingerprint": lomd.fingerprint,
                "targets": len(lomd.targets),
            },
            indent=2,
        )
    )
    return 0


def _distill(args) -> int:
    from tqdm import tqdm

    dims = model_dims(args.model)
    paths = lora_paths(args.loras)
    config = DistillConfig(
        args.rank, args.rank_mid, args.targets, args.sketch_rank, args.weighting, args.seed
    )
    bar = tqdm(total=2 * len(paths), disable=args.quiet, file=sys.stderr, unit="file", dynamic_ncols=True)

    def progress(done: int, total: int, message: str) -> None:
        bar.n = done
        bar.set_postfix_str(message, refresh=False)
        bar.refresh()

    try:
        report = distill_lomd(paths, dims, config, progress)
    finally:
        bar.close()
    path = save_lomd(args.out, report.lomd)
    for file, reason in report.skipped:
        print(f"skipped {file}: {reason}", file=sys.stderr)
    layers = sorted(report.energy.items(), key=lambda kv: kv[1].mean)
    shown = layers if args.per_layer else layers[:5]
    if shown:
        print("energy kept per layer (mean / worst LoRA), lowest first:", file=sys.stderr)
        for name, e in shown:
            print(
                f"  {name:40s} {e.mean:6.1%} / {e.worst:6.1%} ({e.worst_lora}, {e.loras} LoRAs)",
                file=sys.stderr,
            )
    print(json.dumps({"written": str(path), "lomd_source": "distilled", **report.summary()}, indent=2))
    return 0


def _common(p) -> None:
    p.add_argument("--out", required=True, help="LoMD to write (.safetensors)")
    p.add_argument("--model", default="FLUX", help=MODEL_HELP)
    p.add_argument("--rank", type=int, default=4, help="rank of the Down (rank_down, default 4)")
    p.add_argument("--rank-mid", type=int, default=16, help="Mid rank identities default to (default 16)")
    p.add_argument("--targets", default=DEFAULT_PRESET, help=presets_help())


def register(sub):
    lomd = sub.add_parser("lomd", help="make a LoMD without meta-training: seeded (no prior) or distilled")
    lsub = lomd.add_subparsers(dest="lomd_command", required=True, metavar="LOMD_COMMAND")

    p = lsub.add_parser(
        "seeded",
        help="an orthonormal random Down from a seed: NO prior (identities behave like a rank-4 LoRA with a "
        "frozen random down projection); lets the pack run with FLUX alone",
    )
    _common(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the orthonormal Down")
    p.set_defaults(func=_seeded)

    p = lsub.add_parser(
        "distill",
        help="the input subspace a collection of FLUX.1 (or Qwen-Image) LoRAs shares (per layer), read one file at "
        "a time",
    )
    p.add_argument(
        "--loras", nargs="+", required=True, help="LoRA files and/or folders (every *.safetensors below)"
    )
    _common(p)
    p.add_argument(
        "--weighting",
        choices=["energy", "none"],
        default="energy",
        help="energy: every LoRA counts the same in each layer it covers (default); none: louder LoRAs weigh more",
    )
    p.add_argument(
        "--sketch-rank", type=int, default=None, help="rows kept per layer (default max(8*rank, 32))"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the Down of layers no LoRA covers")
    p.add_argument("--per-layer", action="store_true", help="print the energy kept for every layer")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_distill)
