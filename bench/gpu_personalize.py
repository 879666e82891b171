"""The real ``metalora personalize`` on a full-size FLUX, on your GPU: loop time, s/step and peak VRAM.

    python bench/gpu_personalize.py                        # FLUX.1-dev size, 512 px, 375 steps per setting
    python bench/gpu_personalize.py --short-steps 100      # the headline bf16 run at 375, the rest at 100

No real weights are needed: it writes a random FLUX.1-dev-sized transformer (bf16, 23.8 GB, in
``--work``) once, a tiny VAE (encoding a photo is not what is measured), random text features of 512
tokens, a seeded LoMD and a 512 px photo, then runs the real command, each setting in its own process:

  bf16            --dtype bfloat16 --checkpointing off
  bf16+ckpt       --dtype bfloat16 --checkpointing on
  fp8             --dtype float8_e4m3fn --checkpointing off
  fp8+ckpt        --dtype float8_e4m3fn --checkpointing on

For each: the training loop's seconds (the command's own ``seconds``, loading excluded), s/step, the
peak of ``torch.cuda.max_memory_allocated`` and the peak memory in use on the whole device while it ran
(sampled every 20 ms: the CUDA context and the allocator's cache included). A separate process times
the floor, the frozen model's own forward + backward at the same size and text length. The last line is
``ratio gpu_step_over_floor X``: the bf16 step over the floor.

``--device cpu`` with a tiny ``--hidden``/``--depth`` runs the same path on the CPU (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from metalora_core.targets import FluxDims  # noqa: E402

SETTINGS = {
    "bf16": ["--dtype", "bfloat16", "--checkpointing", "off"],
    "bf16+ckpt": ["--dtype", "bfloat16", "--checkpointing", "on"],
    "fp8": ["--dtype", "float8_e4m3fn", "--checkpointing", "off"],
    "fp8+ckpt": ["--dtype", "float8_e4m3fn", "--checkpointing", "on"],
}
TEXT_TOKENS = 512


def dims_of(args) -> FluxDims:
    return FluxDims(args.hidden, 4 * args.hidden, args.depth, args.depth_single, 16, 4096, 768, True, 16)


def prepare(args) -> dict[str, Path]:
    """The random FLUX folder and the small inputs, written once into ``--work``."""
    import numpy as np
    from PIL import Image

    from metalora_core.adapter import AdapterShape
    from metalora_core.dev.conditioning import write_random_conditioning
    from metalora_core.dev.tiny_vae import write_tiny_vae
    from metalora_core.formats import save_lomd
    from metalora_core.lomd.seeded import seeded_lomd
    from metalora_core.targets import diffusers_config_for

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = {k: work / v for k, v in (("flux", "flux"), ("vae", "vae"), ("cond", "cond.safetensors"))}
    paths.update(lomd=work / "lomd.safetensors", photo=work / "photo.png")
    dims = dims_of(args)
    if not (paths["flux"] / "config.json").is_file():
        from diffusers import FluxTransformer2DModel

        t0 = time.perf_counter()
        torch.manual_seed(0)
        with torch.device(args.device):
            model = FluxTransformer2DModel(**diffusers_config_for(dims)).to(torch.bfloat16)
        model.save_pretrained(str(paths["flux"]))
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # this process stays while the runs are measured: hold no GPU memory
        print(
            f"wrote a random FLUX ({dims.hidden} wide) in {time.perf_counter() - t0:.1f} s", file=sys.stderr
        )
    if not (paths["vae"] / "config.json").is_file():
        write_tiny_vae(paths["vae"])
    if not paths["cond"].is_file():
        write_random_conditioning(paths["flux"], paths["cond"], TEXT_TOKENS)
    if not paths["lomd"].is_file():
        save_lomd(paths["lomd"], seeded_lomd(dims, AdapterShape(4, 16)))
    if not paths["photo"].is_file():
        yy, xx = np.mgrid[0 : args.px, 0 : args.px]
        rgb = np.stack([(xx * 255 // args.px), (yy * 255 // args.px), ((xx + yy) * 127 // args.px)], -1)
        Image.fromarray(rgb.astype(np.uint8)).save(paths["photo"])
    return paths


class DevicePeak:
    """Peak memory in use on the whole device (``total - free``), sampled by a thread; 0 on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self.running = device, 0, device.type == "cuda"
        if self.running:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()

    def _sample(self) -> None:
        while self.running:
            free, total = torch.cuda.mem_get_info(self.device)
            self.peak = max(self.peak, total - free)
            time.sleep(0.02)

    def stop(self) -> int:
        if self.running:
            self.running = False
            self.thread.join()
        return self.peak


def one(args) -> int:
    """Child process: one ``metalora personalize`` run, measured."""
    from metalora_core.cli.main import main

    paths = {k: Path(v) for k, v in json.loads(args.paths).items()}
    device = torch.device(args.device)
    out = Path(args.work) / f"identity-{args.one.replace('+', '_')}.safetensors"
    steps = args.steps if args.one == "bf16" else args.short_steps
    argv = [
        "personalize", "--flux", str(paths["flux"]), "--vae", str(paths["vae"]),
        "--conditioning", str(paths["cond"]), "--lomd", str(paths["lomd"]), "--image", str(paths["photo"]),
        "--out", str(out), "--steps", str(steps), "--resolution", str(args.px), "--device", args.device,
        "--quiet", *SETTINGS[args.one],
    ]  # fmt: skip
    peak = DevicePeak(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    from contextlib import redirect_stdout
    from io import StringIO

    buffer = StringIO()
    with redirect_stdout(buffer):
        code = main(argv)
    device_peak = peak.stop()
    result = json.loads(buffer.getvalue().strip().splitlines()[-1])
    allocated = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    print(
        json.dumps(
            {
                "setting": args.one,
                "code": code,
                "steps": result["steps"],
                "loop_s": result["seconds"],
                "s_per_step": result["seconds"] / result["steps"],
                "max_allocated_gib": allocated / 2**30,
                "device_peak_gib": device_peak / 2**30,
                "precision": result.get("precision"),
                "final_loss": result["final_loss"],
            }
        )
    )
    return code


def floor(args) -> int:
    """Child process: the frozen model's forward + backward at the same size (median of the timed steps)."""
    from metalora_core.training.diffusers_backend import DiffusersBackend
    from metalora_core.training.objective import flow_loss
    from metalora_core.training.protocol import TextConditioning

    paths = {k: Path(v) for k, v in json.loads(args.paths).items()}
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = DiffusersBackend.from_path(paths["flux"], dtype, device)
    g = torch.Generator().manual_seed(0)
    side = args.px // 8
    x0 = torch.randn(1, 16, side, side, generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    cond = TextConditioning(torch.randn(TEXT_TOKENS, backend.dims.context_dim, generator=g)).to(device, dtype)
    t = torch.tensor([0.6], device=device)
    times = []
    for i in range(args.floor_steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        flow_loss(backend, x0.detach().requires_grad_(True), cond, t, noise).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    times.sort()
    print(json.dumps({"setting": "floor", "s_per_step": times[len(times) // 2]}))
    return 0


def child(args, what: list[str], paths: dict[str, Path]) -> dict | None:
    """Run ``what`` (``--floor`` or ``--one SETTING``) in a fresh process: clean memory statistics each."""
    value = what[-1].lstrip("-")
    cmd = [sys.executable, __file__, *what, "--paths", json.dumps({k: str(v) for k, v in paths.items()})]
    for name in ("work", "device", "px", "steps", "short_steps", "floor_steps"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        print(f"{value}: stopped after {args.timeout} s", file=sys.stderr)
        return None
    sys.stderr.write(done.stderr[-3000:])
    if done.returncode != 0:
        print(f"{value}: failed (exit {done.returncode})", file=sys.stderr)
        return None
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["wall_s"] = time.perf_counter() - t0
    print(json.dumps(row), flush=True)  # as it comes: a run stopped later keeps what was measured
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="gpu-personalize-work", help="folder for the random FLUX and inputs")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--px", type=int, default=512, help="training resolution (square photo)")
    ap.add_argument("--steps", type=int, default=375, help="steps of the bf16 run (default 375)")
    ap.add_argument("--short-steps", type=int, default=375, help="steps of the other settings")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma list of " + ", ".join(SETTINGS))
    ap.add_argument("--floor-steps", type=int, default=10, help="timed floor steps (0: no floor)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per setting before it is stopped")
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--depth", type=int, default=19)
    ap.add_argument("--depth-single", type=int, default=38)
    ap.add_argument("--one", choices=list(SETTINGS), help=argparse.SUPPRESS)
    ap.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--paths", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        return one(args)
    if args.floor:
        return floor(args)
    print(f"torch {torch.__version__}, device {args.device}", flush=True)
    paths = prepare(args)
    rows = {"floor": child(args, ["--floor"], paths) if args.floor_steps else None}
    for name in args.settings.split(","):
        rows[name] = child(args, ["--one", name], paths)
    print(
        f"\n{args.px} px, {TEXT_TOKENS} text tokens, hidden {args.hidden}, {args.depth}+{args.depth_single} blocks"
    )
    print(
        "| setting | steps | loop s | s/step | vs floor | max allocated GiB | device peak GiB | process wall s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    floor_s = rows["floor"]["s_per_step"] if rows["floor"] else None
    for name, r in rows.items():
        if r is None and name == "floor" and not args.floor_steps:
            continue
        if r is None:
            print(f"| {name} | failed or stopped | | | | | | |")
            continue
        ratio = f"{r['s_per_step'] / floor_s:.2f}" if floor_s else "-"
        if name == "floor":
            print(
                f"| floor (frozen fwd+bwd) | - | - | {r['s_per_step']:.3f} | 1.00 | - | - | {r['wall_s']:.0f} |"
            )
            continue
        print(
            f"| {name} | {r['steps']} | {r['loop_s']:.1f} | {r['s_per_step']:.3f} | {ratio} | "
            f"{r['max_allocated_gib']:.1f} | {r['device_peak_gib']:.1f} | {r['wall_s']:.0f} |"
        )
    if floor_s and rows.get("bf16"):
        print(f"ratio gpu_step_over_floor {rows['bf16']['s_per_step'] / floor_s:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
