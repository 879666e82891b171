"""``metalora demo [--out DIR]``: the main job end to end, no downloads, no arguments needed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..demo.pipeline import REAL, TINY, DemoOptions, run_demo
from ..training.precision import PRECISION_CHOICES
from . import preflight


def run(args) -> int:
    from ..demo.report import write_report

    started, cpu = time.perf_counter(), time.process_time()
    options = DemoOptions(
        out=Path(args.out),
        **{k: getattr(args, k) for k in (
            "flux", "vae", "conditioning", "lomd", "image", "references", "face_model", "insightface_root",
            "steps", "resolution", "sample_steps", "meta_steps", "images", "seed", "device", "dtype", "quiet",
        )},
        baseline=not args.no_baseline,
    )  # fmt: skip
    result = run_demo(options)
    html_path, json_path = write_report(result, options.out, options.tiny)
    wall = time.perf_counter() - started
    print(
        json.dumps(
            {
                "report": str(html_path),
                "json": str(json_path),
                "wall_s": round(wall, 1),
                "cpu_s": round(time.process_time() - cpu, 1),
                "last_quarter_loss": {k: round(v["last_quarter_loss"], 5) for k, v in result.methods.items()},
            }
        ),
        flush=True,
    )
    preflight.say(
        f"metalora demo: done in {wall:.0f} s. Open {html_path} in a browser to see the report.", args.quiet
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole job in one command: LoMD, personalize, generate, score, export, report.html",
        description="Runs every stage on tiny models built on the spot and a face photo insightface ships "
        "(no downloads; under a minute on 2 CPU cores) and writes report.html and report.json. Tiny random "
        "models show the mechanics, not quality. Given real weights (--flux, --vae or a pipeline folder, "
        "--lomd, --image, --face-model) the same command runs the real pipeline.",
    )
    p.add_argument("--out", default="metalora-demo", help="folder for the report and every file made")
    p.add_argument(
        "--flux", help="real FLUX: pipeline folder or transformer file (default: a tiny random FLUX)"
    )
    p.add_argument("--vae", help="diffusers AutoencoderKL folder (default: the pipeline's vae/)")
    p.add_argument("--conditioning", help="precomputed text features (default: encode the caption)")
    p.add_argument("--lomd", help="LoMD to personalize with (default: meta-train a tiny one)")
    p.add_argument("--image", help="the photo of the person (default: insightface's sample face)")
    p.add_argument("--references", help="folder of the person's other photos, for R-FaceSim")
    p.add_argument(
        "--face-model", help="insightface model folder name for scoring (default: tiny test models)"
    )
    p.add_argument(
        "--insightface-root",
        default="~/.insightface",
        help="folder holding insightface/models/<name>/ (ComfyUI's models folder)",
    )
    p.add_argument(
        "--steps",
        type=int,
        help=f"personalization steps (default {TINY['steps']} tiny, {REAL['steps']} real)",
    )
    p.add_argument(
        "--resolution",
        type=int,
        help=f"training / generation size (default {TINY['resolution']} tiny, {REAL['resolution']} real)",
    )
    p.add_argument(
        "--sample-steps",
        type=int,
        help=f"sampler steps (default {TINY['sample_steps']} tiny, {REAL['sample_steps']} real)",
    )
    p.add_argument(
        "--meta-steps", type=int, help=f"meta-training steps of the tiny LoMD (default {TINY['meta_steps']})"
    )
    p.add_argument("--images", type=int, default=4, help="images generated with and without the identity")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where FLUX runs (default here: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        choices=PRECISION_CHOICES,
        default="auto",
        help="FLUX weights: auto (bf16 on a GPU, float32 on the CPU) or a dtype, as in `metalora personalize`",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the plain-LoRA comparison")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)
