"""``metalora dev ...``: build the small test assets the test-suite uses, so anyone can reproduce a test."""

from __future__ import annotations

import json

from ..adapter import AdapterShape
from ..dev.random_assets import random_adapter, random_lomd
from ..dev.tiny_flux import tiny_dims, write_tiny_flux
from ..formats import load_lomd, save_identity, save_lomd
from ..targets import DEFAULT_PRESET, presets_help


def _tiny_flux(args) -> int:
    dims = tiny_dims(args.hidden, args.depth, args.depth_single)
    path = write_tiny_flux(args.out, args.format, dims, args.seed)
    print(json.dumps({"written": str(path), "format": args.format, "hidden": dims.hidden}))
    return 0


def _random_lomd(args) -> int:
    shape = AdapterShape(args.rank_down, args.rank_mid, args.alpha)
    lomd = random_lomd(args.model, shape, args.targets, args.seed)
    path = save_lomd(args.out, lomd)
    print(json.dumps({"written": str(path), "fingerprint": lomd.fingerprint, "targets": len(lomd.targets)}))
    return 0


def _random_adapter(args) -> int:
    lomd = load_lomd(args.lomd)
    adapter = random_adapter(lomd, args.model, args.seed, args.up_std)
    path = save_identity(args.out, adapter)
    print(
        json.dumps(
            {"written": str(path), "fingerprint": adapter.fingerprint, "lomd_fingerprint": lomd.fingerprint}
        )
    )
    return 0


def register(sub):
    """Add the ``dev`` group with this module's builders; returns the group's sub-parsers for others."""
    dev = sub.add_parser(
        "dev", help="for tests and bug reports, not for use: builders of tiny random models and files"
    )
    dsub = dev.add_subparsers(dest="dev_command", required=True, metavar="DEV_COMMAND")

    p = dsub.add_parser(
        "tiny-flux", help="a tiny, complete FLUX.1-dev-shaped checkpoint ComfyUI and diffusers load"
    )
    p.add_argument(
        "--format",
        choices=["bfl", "diffusers"],
        default="bfl",
        help="bfl: one .safetensors with FLUX/ComfyUI names; diffusers: a transformer folder",
    )
    p.add_argument("--out", required=True, help="output file (bfl) or folder (diffusers)")
    p.add_argument("--hidden", type=int, default=128, help="width, a multiple of 128 (default 128)")
    p.add_argument("--depth", type=int, default=2, help="double blocks (default 2)")
    p.add_argument("--depth-single", type=int, default=2, help="single blocks (default 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights / drawings")
    p.set_defaults(func=_tiny_flux)

    p = dsub.add_parser("random-lomd", help="a random LoMD fitting a FLUX checkpoint")
    p.add_argument("--model", required=True, help="FLUX checkpoint (.safetensors or diffusers folder)")
    p.add_argument("--out", required=True, help="LoMD file to write (.safetensors)")
    p.add_argument("--rank-down", type=int, default=4, help="LoMD rank")
    p.add_argument("--rank-mid", type=int, default=16, help="default Mid rank recorded for identities")
    p.add_argument("--alpha", type=float, default=None, help="default: rank-down (scale 1)")
    p.add_argument("--targets", default=DEFAULT_PRESET, help=presets_help())
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights / drawings")
    p.set_defaults(func=_random_lomd)

    p = dsub.add_parser("random-adapter", help="a random identity adapter (non-zero Up) for a LoMD")
    p.add_argument("--lomd", required=True, help="the LoMD the identity belongs to")
    p.add_argument("--model", required=True, help="FLUX checkpoint the LoMD fits")
    p.add_argument("--out", required=True, help="identity file to write (.safetensors)")
    p.add_argument("--up-std", type=float, default=0.02, help="standard deviation of the random Up")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights / drawings")
    p.set_defaults(func=_random_adapter)
    return dsub
