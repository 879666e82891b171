"""``metalora lora difference|merge|resize|extract|rescale``: LoRA file tools, streaming layer by layer.

Every command reads kohya / ComfyUI / diffusers naming, writes ``--format`` (so each also converts), prints
a JSON summary and, with ``--report``, writes the per-layer ranks, energy kept and errors as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import MetaLoRAError
from ..loras import tools

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _refuse_overwrite(args) -> None:
    if Path(args.out).exists() and not args.overwrite:
        raise MetaLoRAError(f"{args.out} already exists; pass --overwrite to replace it")


def _truncation(args) -> dict:
    return {"rank": args.rank, "energy": args.energy}


def _run(args) -> int:
    _refuse_overwrite(args)
    common = {"fmt": args.format, "dtype": DTYPES[args.dtype]}
    if args.lora_command == "difference":
        report = tools.difference(args.a, args.b, args.out, **_truncation(args), **common)
    elif args.lora_command == "merge":
        weights = args.weights or [1.0] * len(args.loras)
        report = tools.merge(args.loras, weights, args.out, **_truncation(args), **common)
    elif args.lora_command == "resize":
        report = tools.resize(args.lora, args.out, **_truncation(args), **common)
    elif args.lora_command == "rescale":
        report = tools.rescale(args.lora, args.out, args.factor, **common)
    else:
        report = tools.extract(args.base, args.tuned, args.out, args.rank, args.energy, args.preset, **common)
    if args.report:
        Path(args.report).write_text(json.dumps(report.as_dict(), indent=2))
    print(json.dumps(report.summary()))
    return 0


def _output_args(p, truncation: str | None) -> None:
    p.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    p.add_argument("--format", choices=["kohya", "diffusers"], default="kohya", help="naming of the output")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the output tensors")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--report", help="also write the per-layer report (ranks, energy kept, errors) as JSON")
    if truncation == "optional":
        group = p.add_mutually_exclusive_group()
        group.add_argument("--rank", type=int, help="compress to this rank by SVD (default: exact)")
        group.add_argument("--energy", type=float, help="compress keeping this fraction of spectral energy")
    elif truncation == "required":
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("--rank", type=int, help="the rank to keep")
        group.add_argument(
            "--energy", type=float, help="the fraction of each layer's spectral energy to keep"
        )


def register(sub) -> None:
    p = sub.add_parser("lora", help="LoRA file tools: difference, merge, resize, extract, rescale")
    p.set_defaults(func=_run)
    lsub = p.add_subparsers(dest="lora_command", required=True, metavar="TOOL")

    d = lsub.add_parser("difference", help="B minus A: exact (factors concatenated) or compressed")
    d.add_argument("a", help="the LoRA subtracted")
    d.add_argument("b", help="the LoRA kept")
    _output_args(d, "optional")

    m = lsub.add_parser("merge", help="weighted sum of LoRAs: exact or compressed")
    m.add_argument("loras", nargs="+", help="the LoRA files")
    m.add_argument("--weights", type=float, nargs="+", help="one weight per LoRA (default: all 1)")
    _output_args(m, "optional")

    r = lsub.add_parser("resize", help="truncated SVD per layer, with a per-layer error report")
    r.add_argument("lora", help="the LoRA file")
    _output_args(r, "required")

    s = lsub.add_parser("rescale", help="multiply every change by a factor (ranks kept)")
    s.add_argument("lora", help="the LoRA file")
    s.add_argument("--factor", type=float, required=True, help="the multiplier (negative inverts the LoRA)")
    _output_args(s, None)

    e = lsub.add_parser("extract", help="a LoRA of fine-tuned minus base FLUX checkpoint (truncated SVD)")
    e.add_argument("base", help="the base FLUX checkpoint (BFL / ComfyUI single .safetensors)")
    e.add_argument("tuned", help="the fine-tuned FLUX checkpoint, same layout and sizes")
    e.add_argument("--rank", type=int, default=16, help="rank to write (the cap with --energy); default 16")
    e.add_argument("--energy", type=float, help="keep the smallest rank reaching this energy fraction")
    e.add_argument("--preset", default="all_linear", help="which layers to extract (a target preset)")
    _output_args(e, None)
